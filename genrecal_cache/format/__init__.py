"""The cache format itself: manifest schema, hidden-state codecs, teacher head file, checks of untrusted
files. Imports nothing else of genrecal; everything else of genrecal_cache builds on it."""
