"""pairgan's library: config schema, data, networks, methods, training, evaluation, registry.

Components take typed config objects; they never read `params/` or the environment.
"""
