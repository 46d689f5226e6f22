"""The trajectory farm: recipes (plain torch) and their orchestration (Ray at the edge)."""
from .recipes import RECIPES, Recipe, RecipeContext, get_recipe, register_recipe
from .runner import FarmReport, farm
from .spec import FarmSpec
from .task import FarmData, TrajectoryTask, plan_tasks, prepare_data, run_trajectories, run_trajectory
from . import pad, ssd  # register PAD's experts and the SSD teacher and student recipes  # noqa: F401

__all__ = ["FarmData", "FarmReport", "FarmSpec", "RECIPES", "Recipe", "RecipeContext", "TrajectoryTask", "farm",
           "get_recipe", "plan_tasks", "prepare_data", "register_recipe", "run_trajectories", "run_trajectory"]
