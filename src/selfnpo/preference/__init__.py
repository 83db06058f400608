"""Preference data: pair files, building pairs with a reward, Pick-a-Pic."""
