"""Deployment: package a bundle for a target device (`build_package`), with the launcher that runs it there."""

from .package import PackageResult, build_package

__all__ = ["PackageResult", "build_package"]
