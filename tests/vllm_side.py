"""Runs in the vLLM virtualenv (.venv-vllm), started by tests/test_vllm_backend.py: the
vLLM backend's worker on whole data files, each RAW table (exact values, before the cache
codec) written as Parquet for the main environment to compare with the transformers
backend's.

    python tests/vllm_side.py SPEC.json

SPEC: {"timings": FILE.json, "runs": [{"teacher": DIR, "jobs": [{"data": FILE, "image_root": DIR, "records": "...",
"k": K, "out": FILE.parquet}, ...]}, ...]}. One vllm.LLM per run (teacher), shared by its jobs.
"""

import gc
import json
import sys
import time

import pyarrow.parquet as pq


def main(spec_path: str) -> None:
    from mmkd.common.config import InputsConfig
    from mmkd.common.samples import read_llava, read_preference
    from mmkd.pipelines.config import TeacherPassConfig
    from mmkd.pipelines.workers import VllmTeacherWorker, sample_item
    from mmkd.teacher_cache.extract import parse_records

    spec = json.loads(open(spec_path).read())
    timings = []
    worker = llm = None
    for run in spec["runs"]:
        # vLLM's parallel groups are process-global: the previous engine must be gone before
        # the next one starts, or its late destructor tears down the new engine's groups
        del worker, llm
        gc.collect()
        worker = llm = None
        for job in run["jobs"]:
            cfg = TeacherPassConfig(teacher=run["teacher"], inputs=InputsConfig(job["data"], job["image_root"]),
                                    records=job["records"], k=job.get("k", 8), max_length=job.get("max_length", 256),
                                    backend="vllm")
            t0 = time.time()
            worker = VllmTeacherWorker(cfg, llm=llm)
            llm = worker.llm
            t1 = time.time()
            pairs = parse_records(cfg.records) == ["preference"]
            items = read_preference(cfg.inputs.data) if pairs else read_llava(cfg.inputs.data)
            table = worker({"sample": [sample_item(x)["sample"] for x in items]})
            pq.write_table(table, job["out"])
            timings.append({"out": job["out"], "load_s": t1 - t0, "score_s": time.time() - t1, "rows": table.num_rows})
    with open(spec["timings"], "w") as f:  # not stdout: vLLM logs there
        json.dump(timings, f)


if __name__ == "__main__":
    main(sys.argv[1])
