"""Deliberately broken: importing this module raises, as a plugin with a bad dependency would."""

raise RuntimeError("this plugin is broken on purpose (simulated missing native library)")
