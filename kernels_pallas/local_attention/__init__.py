"""Block-sparse local (sliding-window / neighborhood) attention kernels."""
