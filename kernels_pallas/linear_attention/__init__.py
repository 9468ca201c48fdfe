"""Raw Pallas builders for blocked linear attention (Lightning Attention-2)."""
