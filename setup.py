"""Only here because cffi's build hook (cffi_modules) is a setuptools setup() argument."""
from setuptools import setup

setup(cffi_modules=["native/ffi/build_cpu.py:ffibuilder"])
