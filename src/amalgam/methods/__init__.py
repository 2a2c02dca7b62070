"""Amalgamation methods: one small module per file, each returning named, weighted losses."""

from amalgam.methods.base import Method
from amalgam.methods.cfl import CFL, CommonFeatureBlock
from amalgam.methods.kd import KD
from amalgam.methods.scratch import Scratch

__all__ = ["CFL", "KD", "CommonFeatureBlock", "Method", "Scratch"]
