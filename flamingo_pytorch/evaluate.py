"""``python -m flamingo_pytorch.evaluate``: few-shot captioning, VQA and classification, as OpenFlamingo
evaluates (the logic lives in ``flamingo_pytorch.evaluation``; see docs/evaluation.md)."""

from flamingo_pytorch.evaluation.cli import main

if __name__ == "__main__":
    main()
