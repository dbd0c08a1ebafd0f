"""Reading the JSON reports the stages hand each other, with errors that name the file and the key."""

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Report = TypeVar("Report", bound=BaseModel)


def read_report(path: Path, model: type[Report], when_missing: str) -> Report:
    """`path` parsed and validated as `model`.

    A missing file raises FileNotFoundError "<path>: <when_missing>" (say what to run first);
    invalid JSON or content of another shape raises ValueError listing each key and what is wrong.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {when_missing}") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc']))}: {item['msg']}" if item["loc"] else item["msg"]
            for item in error.errors()
        )
        raise ValueError(f"{path}: not a valid report ({problems})") from None
