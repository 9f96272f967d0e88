"""Model interfaces shipped with core, registered as a plugin through core's own entry points."""
