"""Semi-supervised label subsets: make, write and validate key lists."""
