"""Post-training: chat templates, conversation readers, packing, LoRA, and the SFT entry."""
