"""Task YAMLs shipped with the plugin (none yet): lmms-eval adds this folder to its task search path."""
