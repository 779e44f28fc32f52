"""Training loops for the served codecs (the serving code never imports them)."""
