"""amalgam: knowledge amalgamation of heterogeneous teachers into one student, label-free."""

__version__ = "0.1.0"
