"""The article's `verl.utils.*` import paths, as `verlite.utils.*`."""
