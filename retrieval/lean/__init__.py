"""The query path without torch: numpy twins of the torch code for the default settings, checked against it by
oracle tests. Nothing here imports torch, directly or indirectly."""
