"""(being written)"""
from discon_core.hooks import hookimpl


@hookimpl
def discon_register_components(register):
    pass
