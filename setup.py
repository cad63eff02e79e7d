"""Packaging beside pyproject.toml, for what its tables cannot say: the profiles/ folder of the checkout goes into
the wheel as the package quantkit.builtin_profiles, where quantkit.profiles finds them once installed."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["quantkit*"]) + ["quantkit.builtin_profiles"],
    package_dir={"quantkit.builtin_profiles": "profiles"},
    package_data={"quantkit": ["data/*"], "quantkit.dashboard": ["templates/*.html", "static/*"],
                  "quantkit.builtin_profiles": ["*.yaml"]},
)
