"""The stable public path of :mod:`aligner.distributed.comm` for plugins: the device a collective's tensors go on."""

from aligner.distributed.comm import backend_device_type, comm_device  # noqa: F401
