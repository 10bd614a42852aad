"""labhelpers: the lab bench of the qwen-deploy-lab course. The notebooks call transformers,
GPTQModel, vLLM, IPEX-LLM, llama.cpp, OpenVINO and TensorRT-LLM themselves; this package only
sets up the bench around them. One noun per module; a module imports only modules above it in
this list (tests/test_architecture.py checks it). Heavy libraries are imported inside functions,
so ``import labhelpers.<module>`` is instant and works in every course environment.

    files      the course cache, atomic folder writes, sizes, quiet library output
    machine    this computer: report, GPU guard, RAM check, GPU datasheets          (00, all)
    envs       the course's venvs/kernels; run a job in another one                  (03, 06)
    models     registry, resolve/download, folder checks, safetensors, ModelShape     (all)
    compat     version / driver / GPU / CPU rules kept as data                       (00)
    fits       which models and notebooks fit this machine                           (00)
    measure    token timing, memory, streams, perplexity, tables, plots              (01-09)
    roofline   memory bandwidth and the decode roofline                              (00-07)
    gptq       calibration data, checks before a run, RTN, GPTQModel on a CPU        (02)
    ipex       IPEX-LLM: transformers-4.37 copy, formats, kernels, measure a format  (03, 06)
    gguf       llama.cpp's GGUF files: convert, quantize, measure one                (06, 07)
    openvino   OpenVINO int4: measure an exported IR in its environment             (06, 07b)
    serve      start/stop OpenAI-compatible servers; vLLM command lines              (04-09)
    loadtest   concurrent streamed requests, percentiles, sweep plot                 (05, 07)
    sizing     TensorRT-LLM memory/feasibility from config.json                      (04, 05)

Built on the bench, never imported by it: ``whichbackend`` (notebook 06's comparison of every
backend, ``python -m whichbackend``), ``tools/`` (set-up commands) and ``apps/`` (chat pages).
"""

__version__ = "0.2.0"
