"""An example third-party aligner plugin (see ``plugin.py``)."""
