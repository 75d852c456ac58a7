"""Running an artifact: ONNX Runtime sessions, generation, manifest checks, offload serving."""

from moeopt.runtime.expert_cache import CacheCounters, ExpertCache, cache_source
from moeopt.runtime.manifest import read_manifest
from moeopt.runtime.offload import AllResident, OffloadSession, open_artifact
from moeopt.runtime.sampling import Sampler
from moeopt.runtime.session import Generation, Session

__all__ = ["AllResident", "CacheCounters", "ExpertCache", "Generation", "OffloadSession", "Sampler", "Session",
           "cache_source", "open_artifact", "read_manifest"]
