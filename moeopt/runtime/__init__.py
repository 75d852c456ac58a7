"""Running an artifact: ONNX Runtime sessions, generation, manifest checks."""

from moeopt.runtime.manifest import read_manifest
from moeopt.runtime.offload import AllResident, OffloadSession, open_artifact
from moeopt.runtime.sampling import Sampler
from moeopt.runtime.session import Generation, Session

__all__ = ["AllResident", "Generation", "OffloadSession", "Sampler", "Session", "open_artifact", "read_manifest"]
