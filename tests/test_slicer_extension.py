"""The Slicer extension's files, checked without Slicer (which cannot be installed here).

What can be known without the application: the Extension Wizard layout and its metadata,
that the module's CMakeLists lists every Python file and resource, that the Lib imports
nothing of Slicer, Qt, CTK or VTK, and that the widget only names widgets that exist in
its ``.ui`` and parameters that exist in its parameter node. The GUI itself is exercised by
the module's own ``TaskAdaptiveCTTest`` inside Slicer (see the README).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from app_server import ROOT

EXTENSION = ROOT / "TaskAdaptiveCT"
MODULE = EXTENSION / "TaskAdaptiveCT"
UI_FILE = MODULE / "Resources" / "UI" / "TaskAdaptiveCT.ui"
WIDGET_FILE = MODULE / "TaskAdaptiveCT.py"
GUI_MODULES = ("slicer", "qt", "ctk", "vtk", "PythonQt")


def cmake_list(text: str, variable: str) -> list[str]:
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert block, f"no set({variable} ...)"
    return [item.replace("${MODULE_NAME}", "TaskAdaptiveCT") for item in block[1].split()]


def test_the_extension_has_the_wizard_layout_and_its_metadata():
    top = (EXTENSION / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', top), key
    assert "add_subdirectory(TaskAdaptiveCT)" in top and "Slicer_EXTENSION_CPACK" in top
    for path in ("TaskAdaptiveCT.png", "TaskAdaptiveCT/TaskAdaptiveCT.py", "TaskAdaptiveCT/Resources/UI/TaskAdaptiveCT.ui",
                 "TaskAdaptiveCT/Resources/Icons/TaskAdaptiveCT.png", "TaskAdaptiveCT/Testing/Python/CMakeLists.txt"):
        assert (EXTENSION / path).is_file(), path
    assert (EXTENSION / "TaskAdaptiveCT.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_module_cmakelists_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    on_disk = sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk
    for resource in cmake_list(text, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE / resource).is_file(), resource
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_the_lib_imports_nothing_of_slicer_qt_ctk_or_vtk():
    for path in sorted((MODULE / "TaskAdaptiveCTLib").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in GUI_MODULES, f"{path.name} imports {name}"
    # and it imports in an interpreter where those modules cannot be found at all
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
               f"        if name.split('.')[0] in {GUI_MODULES!r}: raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               f"sys.path.insert(0, {str(MODULE)!r})\nimport TaskAdaptiveCTLib, TaskAdaptiveCTLib.status\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_widget_names_only_widgets_of_its_ui_and_fields_of_its_parameter_node():
    ui = ElementTree.parse(UI_FILE).getroot()
    widgets = {w.get("name") for w in ui.iter("widget")}
    source = WIDGET_FILE.read_text()
    tree = ast.parse(source)  # the module file is valid Python
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= widgets, f"not in the .ui: {sorted(used - widgets)}"
    parameter_class = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "TaskAdaptiveCTParameterNode")
    fields = {n.target.id for n in parameter_class.body if isinstance(n, ast.AnnAssign)}
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, f"not parameters: {sorted(bound - fields)}"
    # every non-Qt widget class of the .ui is declared as a custom widget
    classes = {w.get("class") for w in ui.iter("widget")}
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    assert {c for c in classes if not c.startswith("Q")} <= declared
    # the module's parts as Slicer expects them
    names = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"TaskAdaptiveCT", "TaskAdaptiveCTWidget", "TaskAdaptiveCTLogic", "TaskAdaptiveCTTest"} <= names
