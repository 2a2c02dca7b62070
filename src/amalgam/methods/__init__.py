"""Amalgamation methods: one small module per file, each returning named, weighted losses."""

from amalgam.methods.base import Method
from amalgam.methods.cfl import CFL, CommonFeatureBlock
from amalgam.methods.hint import Hint
from amalgam.methods.kd import KD
from amalgam.methods.lka import LKA
from amalgam.methods.scratch import Scratch
from amalgam.methods.uhc import UHC

__all__ = ["CFL", "KD", "LKA", "UHC", "CommonFeatureBlock", "Hint", "Method", "Scratch"]
