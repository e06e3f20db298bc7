"""aligner's built-in plugins, one file each, registered through the ``aligner.plugins`` entry points."""
