"""Built-in config modules: `mso run NAME` loads configs/NAME.py."""
