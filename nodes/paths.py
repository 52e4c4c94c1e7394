"""Register ComfyUI's ``models/salad`` folder for SALAD weight files."""
import logging
import os

import folder_paths

FOLDER_NAME = "salad"
EXTENSIONS = {".safetensors"}


def register_model_folder() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    try:
        os.makedirs(default, exist_ok=True)
    except OSError as e:   # a read-only models folder must not stop the pack from loading
        logging.getLogger("SALAD").warning("SALAD: could not create %s (%s); put weight files in a 'salad' "
                                           "folder named in extra_model_paths.yaml instead", default, e)
    existing = folder_paths.folder_names_and_paths.get(FOLDER_NAME)
    paths = [default]
    if existing:  # paths added from extra_model_paths.yaml (`salad:` key) stay, after the default
        paths += [p for p in existing[0] if os.path.normpath(p) != os.path.normpath(default)]
    folder_paths.folder_names_and_paths[FOLDER_NAME] = (paths, set(EXTENSIONS))
