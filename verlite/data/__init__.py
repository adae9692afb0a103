"""Data: file readers, chat-template formatting with loss masks, the dataset, batching."""
