"""mmkd: offline distillation of multimodal LLMs.

The installed package is one namespace whose subpackages are the repository's top-level
folders, in layers whose imports run down only (docs/architecture.md):

    mmkd.pipelines      orchestration: the Ray teacher pass, the CLI, the demo, recipes
    mmkd.teacher_cache  teacher outputs -> cache records     mmkd.student  the trainer
    mmkd.common         what both halves share: samples, inputs, preprocessing, checks,
                        typed configs, the output head's math
    mmkd.storage        the cache format
"""

__version__ = "0.1.0"
