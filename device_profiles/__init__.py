"""Device profiles shipped with d2mc, one TOML file per device (see :mod:`d2mc.profiles`)."""
