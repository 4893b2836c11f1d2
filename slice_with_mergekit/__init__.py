"""From a scan to a verified, publishable pruned checkpoint, through MergeKit."""
