"""The cohort's member names, one spelling for every module: `student_1` ... `student_N` and the
students' `ensemble`."""
ENSEMBLE = "ensemble"
STUDENT_PREFIX = "student_"


def student_name(i: int) -> str:
    """The name of student `i`, counted from 0: `student_name(0) == "student_1"`."""
    return f"{STUDENT_PREFIX}{i + 1}"


def students_in(names) -> list[str]:
    """The student names among `names` (network names, dict keys or a table's index), in order."""
    return [str(n) for n in names if str(n).startswith(STUDENT_PREFIX)]
