"""Running an artifact: ONNX Runtime sessions, generation, manifest checks."""

from moeopt.runtime.manifest import read_manifest
from moeopt.runtime.sampling import Sampler
from moeopt.runtime.session import Generation, Session

__all__ = ["Generation", "Sampler", "Session", "read_manifest"]
