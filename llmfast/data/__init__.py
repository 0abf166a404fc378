"""Data: synthetic tasks, chat formatting, packing."""
