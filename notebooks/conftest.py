"""pytest --nbmake runs the notebooks in small mode, their figures into a temporary folder
(the kernels inherit this environment)."""
import os
import tempfile

os.environ["TAIPAN_NOTEBOOK_SMALL"] = "1"
os.environ.setdefault("TAIPAN_NOTEBOOK_IMAGES", tempfile.mkdtemp(prefix="taipan_nb_images_"))
