"""pairgan's stages and command line: parse, validate, call components, write outputs."""
