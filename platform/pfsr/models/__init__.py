"""Networks of PF-SR."""
from .rrdb import RRDB, RRDBNet, ResidualDenseBlock
from .sr import Condition, PFSRModel, build_model
from .unet import AttentionBlock, ResBlock, UNet

__all__ = ["RRDB", "RRDBNet", "ResidualDenseBlock", "Condition", "PFSRModel", "build_model", "AttentionBlock",
           "ResBlock", "UNet"]
