"""attnlab: train attention models and find out what their attention means."""
