"""``selfnpo compare``: guidance methods and NPO offsets side by side, at the same prompts and seeds."""
