"""Images: metadata, content and the public /i/{token} URLs."""
