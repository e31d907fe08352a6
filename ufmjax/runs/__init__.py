"""Run folders of trained models: train, load, steer, sweep, save.

- `io`: atomic writes, the JSON rule, Orbax checkpoints with SHA-256 manifests;
- `train`: the one optax loop for every model (exact resume);
- `folders`: opening a run folder for a configuration, sweep files;
- `steer`: `Steering`, what `run.steer(...)` returns for every run type;
- `sweepfile`: sweep files streamed to disk chunk by chunk, and the output-size limit;
- `ufm`, `gpt`: UFM and GPT runs (train, load, steer, sweep);
- `hf`: a pretrained Hugging Face folder as an `HFRun` (load, steer, sweep);
- `load`: `load_run`, dispatching on the model a run's config names.

Submodules import their siblings by module path, so there is no import circle; this file
only re-exports, lazily.
"""

from ufmjax.common import lazy_exports

# public name -> submodule; loaded on first use, so `from ufmjax.runs import io` (atomic
# writes, numpy only) does not import JAX, Flax and Orbax.
_EXPORTS = {
    "load_sweep": "folders", "open_run": "folders", "save_sweep": "folders", "versions": "folders",
    "GPTRun": "gpt", "gpt_sweep": "gpt", "load_gpt_run": "gpt", "scaled_sweep": "gpt", "text_run": "gpt",
    "train_gpt_run": "gpt", "CheckpointError": "io", "RunError": "io", "TrainingDiverged": "io", "load_run": "load", "Steering": "steer",
    "TrainConfig": "train", "UFMRun": "ufm", "load_ufm_run": "ufm", "train_ufm_run": "ufm",
    "ufm_sweep": "ufm", "HFRun": "hf", "hf_sweep": "hf", "load_hf": "hf",
}
_SUBMODULES = ("folders", "gpt", "hf", "io", "load", "progress", "steer", "sweepfile", "train", "ufm")
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("ufmjax.runs", _EXPORTS, _SUBMODULES)
