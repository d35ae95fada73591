"""Privileged-state scripted experts for Robomimic lift, can and square (robosuite 1.5, Panda, OSC_POSE).

They stand in for Robomimic's multi-human (MH) demonstrations. Each expert is a proportional controller
over a short list of phases. Every step it reads the simulator state (object poses, grip site, finger
opening) and moves on when the state says a phase is done, so it follows an object that moved and
starts over when a grasp failed. At reset it draws a strategy at random, independent of the state:

    lift    face   cube face to approach from (+x, +y, -x, -y in the cube's frame; sets the grasp yaw)
    can     side   left or right of the can;  carry  low / high;  place  lower into the bin / drop
    square  handle final direction of the nut's handle (left, right, robot);  carry  low / high;
            release  deep / shallow on the peg
    all     speed  cap on the position action, uniform in [0.7, 1]

Why the data is multimodal in a way whose average fails. Lift and can use a side grasp: the gripper
comes down over the object with its fingers closed, stops 4.5 cm above it, steps down beside it on the
chosen side, opens, slides in horizontally and closes. At the hover point the side does not depend on
the observation and the sides are opposite, so the mean action is "straight down": the closed fingers
land on top of the object and the grasp never happens. A regression (MSE) policy learns about that
mean; a generative policy can commit to one side. Square's handle directions are 90 or 180 degrees
apart: the mean of two turns 90 degrees apart leaves the nut 45 degrees off the square peg. `--blend`
measures this: two experts with different strategies watch the same env, which executes the mean of
their actions.

Quality knobs, for small or noisy sets: `noise` is the std of Gaussian noise added to the six arm
dimensions of every action (the gripper stays a clean +-1 button press, as in human data); `hesitate`
is the probability, per phase, that the operator is imperfect in it: a pause of 5-15 steps, or an
overshoot of 2-4 cm past the phase's target (overshooting while closing misses the grasp; the expert
sees that the object is not in the hand and starts over).

Usage: `reset(rs_env)` after every `env.reset`, then `act(rs_env)` exactly once per env step. `act` returns
the executed action, noise and hesitation included; after it, `intended` holds what a perfect operator would
have done in the same state (no noise, pause or overshoot): the label of DART-style data (Laskey et al. 2017),
whose states come from the imperfect operator and whose actions from the perfect one.

    python scripted_experts.py --task lift --episodes 100 [--noise 0.1] [--hesitate 0.3] [--blend [KEY]]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from scipy.spatial.transform import Rotation

# Controller (robosuite OSC_POSE, delta input): action 1.0 = 5 cm or 0.5 rad per 20 Hz step. The arm
# tracks about 1.3 cm and 0.065 rad per step at full action.
POS_UNIT, ROT_UNIT = 0.05, 0.5
POS_GAIN = 4.0  # position action = POS_GAIN * error / POS_UNIT: full speed until 1.25 cm from the target
ROT_GAIN = 1.5
MAX_YAW_STEP = 0.6  # large turns are fed in steps of at most this (rad): the controller turns the short way
OPEN, CLOSE = -1.0, 1.0  # gripper button; each step moves the finger target a tenth of the full stroke
CLOSE_STEPS = 8  # steps the fingers get to close on an object
SPEED_RANGE = (0.7, 1.0)  # per-demo cap on the position action
PHASE_TIMEOUT = 120  # a phase that lasts longer than this (stuck, perturbed) restarts the task
Q7_LIMIT = 2.6  # keep the Panda's last joint inside its +-2.9 rad range, with a margin

# Panda hand, measured on its collision geoms relative to the grip site (between the fingertips).
R_DOWN = np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]])  # pointing down at yaw 0: fingers close along world y
TIP_BELOW_SITE = 0.0092  # lowest point of the fingers below the grip site
FINGER_HALF_WIDTH = 0.0105  # half extent of a finger across the closing axis

# Side grasp (lift, can).
HOVER = 0.045  # fingertips this far above the object's top before stepping down beside it
ASIDE_DESCENT = 0.7  # descend at 0.7x the lateral speed while stepping aside: the fingertips clear the top
OPEN_MARGIN = 0.02  # slide in once the finger opening exceeds the object's width by this much

# Lift: the cube's half sizes are random per episode (about 2 cm); it is approached along a face normal.
LIFT_FACES = {"+x": 0, "+y": 1, "-x": 2, "-y": 3}  # multiples of 90 degrees from the cube's x axis
CUBE_SIDE_GAP = 0.012  # closed fingers to cube, once beside it
LIFT_Z = 1.0  # lift the grip site to here (success needs the cube 4 cm up)

# Can (PickPlaceCan): the can is a light cylinder (16 g) of radius 2.5 cm and half height 4 cm.
CAN_RADIUS, CAN_HALF_HEIGHT = 0.025, 0.04
CAN_SIDES = {"left": (0.0, 1, 0), "right": (0.0, -1, 0)}  # approach directions (from the far side, +x, the
CAN_GRASP_YAW = np.pi / 2  # arm runs out of reach); fingers close along world x for both sides
CAN_SIDE_GAP = 0.02  # the can tips over when brushed: more room than for the cube
CAN_GRASP_BELOW_TOP = 0.02  # grip site below the can's top: the hand stays 1 cm above it and the bin walls
CAN_CARRY_Z = {"low": 1.0, "high": 1.1}  # grip site while carrying; the bin walls end at 0.9
CAN_PLACE_XY = np.array([0.165, 0.345])  # in the can's quadrant of bin 2, where the arm still reaches
BIN_WALL_TOP = 0.9  # bin walls and bin 2's dividers
CAN_LOWER_TO = 0.005  # "lower": release with the fingertips this far above the dividers (the open fingers
# would hit them further down: the reachable corner of the quadrant is near both dividers)

# Square (NutAssemblySquare): the nut's handle points along its local +x; the square peg (peg1) is axis
# aligned, 3.2 cm wide, its top at z = 0.95; the nut's hole leaves 6.75 mm per side.
NUT_GRIP_X = 0.060  # grip point on the handle, nut-local x (the handle site + 6 mm keeps the fingers off the ring)
NUT_HOVER = 0.08  # above the grip point before descending on the handle
HANDLE_YAW = {"left": np.pi / 2, "right": -np.pi / 2, "robot": np.pi}  # never +x: the arm would run out of reach
SQUARE_CARRY_Z = {"low": 1.0, "high": 1.08}
PEG_TOP, NUT_HALF_THICKNESS = 0.95, 0.01
NUT_ALIGN_ABOVE_PEG = 0.015  # nut bottom above the peg top while centring (the nut tips in the grip and jams
NUT_CENTRE_TOL = 0.003  # if lowered off-centre: wait until it is within 3 mm of the peg axis)
NUT_LOWER_STEP = 0.012  # per-step lowering while inserting
NUT_RELEASE_Z = {"deep": 0.925, "shallow": 0.945}  # release once the nut centre is below this; a nut released
# above the peg swings about the handle as the fingers open and jams on the peg top


def down(yaw: float) -> np.ndarray:
    """Rotation of a gripper pointing straight down with the given yaw."""
    return Rotation.from_rotvec([0, 0, yaw]).as_matrix() @ R_DOWN


def wrap(angle: float, period: float = 2 * np.pi) -> float:
    return (angle + period / 2) % period - period / 2


def yaw_of(R: np.ndarray) -> float:
    return np.arctan2(R[1, 0], R[0, 0])


class Expert:
    """Phase machine, pose controller and quality knobs. A subclass defines CHOICES (the discrete part of
    the strategy), plan() (its phase names for the drawn strategy), one method per phase returning a
    target (grip-site position, gripper rotation, gripper command) and grip_point(rs) (where the held
    object sits between the fingers)."""

    CHOICES: dict[str, tuple] = {}

    def __init__(self, rng: np.random.Generator, noise: float = 0.0, hesitate: float = 0.0):
        self.rng, self.noise, self.hesitate = rng, noise, hesitate
        self.strategy: dict = {}

    def draw_strategy(self, like: dict | None = None, change: str | None = None) -> dict:
        """A random strategy; with `like`, a copy of it whose `change` choice (None: any choice) differs."""
        while True:
            strategy = {k: str(self.rng.choice(v)) for k, v in self.CHOICES.items()}
            strategy["speed"] = round(float(self.rng.uniform(*SPEED_RANGE)), 2)
            if like is None:
                return strategy
            if change is not None:
                strategy = {**like, change: strategy[change]}
            if any(strategy[k] != like[k] for k in ([change] if change else self.CHOICES)):
                return strategy

    def reset(self, rs_env, strategy: dict | None = None) -> dict:
        """Draw a strategy (or use the one given), start from the first phase; returns the strategy."""
        self.strategy = strategy or self.draw_strategy()
        self.phases = self.plan()
        self.goto(self.phases[0])
        return self.strategy

    def goto(self, phase: str) -> None:
        self.phase, self.phase_steps, self.pause, self.overshoot = phase, 0, 0, 0.0
        if self.rng.random() < self.hesitate:  # an imperfect operator in this phase
            if self.rng.random() < 0.5:
                self.pause = int(self.rng.integers(5, 16))
            else:
                self.overshoot = self.rng.uniform(0.02, 0.04)
        self.overshoot_offset = None

    def advance(self) -> None:
        self.goto(self.phases[min(self.phases.index(self.phase) + 1, len(self.phases) - 1)])

    def act(self, rs_env) -> np.ndarray:
        self.phase_steps += 1
        if self.phase_steps > PHASE_TIMEOUT:
            self.goto(self.phases[0])
        pos, rot, grip = getattr(self, self.phase)(rs_env)
        p, R = self.eef(rs_env)
        self.intended = self.pose_action(pos, rot, grip, p, R)  # what a perfect operator would do here (DART label)
        if self.overshoot:  # aim past the target along the horizontal direction of travel, then come back
            if self.overshoot_offset is None:
                travel = (pos - p) * [1, 1, 0]
                if np.linalg.norm(travel) < 0.01:
                    travel = np.array([*self.rng.normal(size=2), 0.0])
                self.overshoot_offset = self.overshoot * travel / np.linalg.norm(travel)
            pos = pos + self.overshoot_offset
            if np.linalg.norm(pos - p) < 0.01 or self.phase_steps > 15:
                self.overshoot = 0.0
        if self.pause > 0:
            self.pause -= 1
            action = np.array([0.0] * 6 + [grip])
        else:
            action = self.pose_action(pos, rot, grip, p, R)
        action[:6] += self.noise * self.rng.standard_normal(6)
        return np.clip(action, -1.0, 1.0)

    def pose_action(self, pos, rot, grip, p, R) -> np.ndarray:
        """The controller: target pose (pos, rot) from the current grip-site pose (p, R), and the gripper button."""
        action, limit = np.zeros(7), self.speed_limits()
        action[:3] = np.clip(POS_GAIN * (pos - p) / POS_UNIT, -limit, limit)
        action[3:6] = np.clip(ROT_GAIN * Rotation.from_matrix(rot @ R.T).as_rotvec() / ROT_UNIT, -1, 1)
        action[6] = grip
        return action

    def speed_limits(self) -> np.ndarray:
        return np.full(3, self.strategy["speed"])

    # Privileged state ---------------------------------------------------------------------------
    @staticmethod
    def eef(rs) -> tuple[np.ndarray, np.ndarray]:
        site = rs.robots[0].eef_site_id["right"]
        return rs.sim.data.site_xpos[site].copy(), rs.sim.data.site_xmat[site].reshape(3, 3).copy()

    @staticmethod
    def finger_gap(rs) -> float:
        q = rs.sim.data.qpos[rs.robots[0]._ref_gripper_joint_pos_indexes["right"]]
        return float(q[0] - q[1])

    def holding(self, rs) -> bool:
        """Checked by position (contacts flicker): the grip point is still between the closed fingers."""
        return np.linalg.norm(self.grip_point(rs) - self.eef(rs)[0]) < 0.02 and self.finger_gap(rs) > 0.01

    def gripper_yaw(self, rs) -> float:
        return yaw_of(self.eef(rs)[1] @ R_DOWN.T)

    def aligned(self, rs, rot: np.ndarray, tol: float = 0.05) -> bool:
        return np.linalg.norm(Rotation.from_matrix(rot @ self.eef(rs)[1].T).as_rotvec()) < tol

    def toward(self, rs, yaw: float) -> np.ndarray:
        """Downward rotation at most MAX_YAW_STEP on the way from the current yaw to `yaw` (continuous)."""
        current = self.gripper_yaw(rs)
        return down(current + np.clip(yaw - current, -MAX_YAW_STEP, MAX_YAW_STEP))

    # Phases shared by the tasks -----------------------------------------------------------------
    def reach(self, rs, pos, rot, grip, tol: float, axes=slice(None)):
        """Target `pos`; move on once the grip site is within `tol` of it (along `axes`)."""
        if np.linalg.norm((self.eef(rs)[0] - pos)[axes]) < tol:
            self.advance()
        return pos, rot, grip

    def hover(self, rs, pos, rot, grip):
        """Target a hover point (straight up first when below it: after a missed grasp); move on once there
        with the gripper turned to `rot`."""
        p, _ = self.eef(rs)
        if p[2] < pos[2] - 0.02:
            return np.array([p[0], p[1], pos[2] + 0.01]), rot, grip
        if self.aligned(rs, rot) and np.linalg.norm((p - pos)[:2]) < 0.01 and abs(p[2] - pos[2]) < 0.015:
            self.advance()
        return pos, rot, grip

    def close(self, rs):
        if self.phase_steps >= CLOSE_STEPS:
            self.advance()
        return (*self.grasp_pose(rs), CLOSE)

    def lift(self, rs):
        """Straight up to the carry height; start over if the object is no longer in the hand."""
        p, _ = self.eef(rs)
        if self.phase_steps > 5 and not self.holding(rs):
            self.goto(self.phases[0])
        elif p[2] > self.carry_z() - 0.02:
            self.advance()
        return np.array([p[0], p[1], self.carry_z()]), down(self.gripper_yaw(rs)), CLOSE

    def release(self, rs):
        """Open in place; once the object is free, move up (success needs the hand away from it)."""
        p, _ = self.eef(rs)
        up = 0.1 if self.finger_gap(rs) > self.release_gap else 0.0
        return p + [0, 0, up], down(self.gripper_yaw(rs)), OPEN


class SideGraspExpert(Expert):
    """Lift and can: hover over the object with closed fingers, step down beside it on the chosen side,
    open, slide in horizontally, close. A subclass gives
    grasp_geometry(rs) -> (object centre, object top z, grip-site z, half width along u, approach direction u)."""

    GRASP_PHASES = ("approach", "step_aside", "open", "slide_in", "close")
    side_gap = CUBE_SIDE_GAP
    hover_height, aside_descent = HOVER, ASIDE_DESCENT  # make_expert(..., hover=, aside_descent=) sets them

    def grasp_yaw(self, rs, u: np.ndarray) -> float:
        yaw, now = np.arctan2(u[1], u[0]), self.gripper_yaw(rs)  # fingers close across u
        return now + wrap(yaw - now, np.pi)  # the fingers are symmetric: turn at most 90 degrees

    def speed_limits(self) -> np.ndarray:
        return super().speed_limits() * ([1, 1, self.aside_descent] if self.phase == "step_aside" else 1)

    def targets(self, rs):
        centre, top, grip_z, half, u = self.grasp_geometry(rs)
        grasp = np.array([centre[0], centre[1], grip_z])
        side = grasp + (half + FINGER_HALF_WIDTH + self.side_gap) * u
        hover = np.array([centre[0], centre[1], top + TIP_BELOW_SITE + self.hover_height])
        return grasp, side, hover, self.toward(rs, self.grasp_yaw(rs, u)), half

    def grasp_pose(self, rs):
        grasp, side, hover, rot, _ = self.targets(rs)
        return grasp, rot

    def approach(self, rs):
        grasp, side, hover, rot, _ = self.targets(rs)
        return self.hover(rs, hover, rot, CLOSE)

    def step_aside(self, rs):
        grasp, side, hover, rot, _ = self.targets(rs)
        return self.reach(rs, side, rot, CLOSE, 0.008)

    def open(self, rs):
        grasp, side, hover, rot, half = self.targets(rs)
        if self.finger_gap(rs) > 2 * half + OPEN_MARGIN:
            self.advance()
        return side, rot, OPEN

    def slide_in(self, rs):
        grasp, side, hover, rot, _ = self.targets(rs)
        return self.reach(rs, grasp, rot, OPEN, 0.004, axes=slice(2))


class LiftExpert(SideGraspExpert):
    CHOICES = {"face": tuple(LIFT_FACES)}

    def plan(self):
        return self.GRASP_PHASES + ("lift",)

    def carry_z(self) -> float:
        return LIFT_Z

    def grip_point(self, rs) -> np.ndarray:
        return rs.sim.data.body_xpos[rs.cube_body_id].copy()

    def grasp_geometry(self, rs):
        centre, face = self.grip_point(rs), LIFT_FACES[self.strategy["face"]]
        phi = yaw_of(rs.sim.data.body_xmat[rs.cube_body_id].reshape(3, 3)) + face * np.pi / 2
        half_sizes = rs.cube.size
        return centre, centre[2] + half_sizes[2], centre[2], half_sizes[face % 2], np.array([np.cos(phi), np.sin(phi), 0])


class CanExpert(SideGraspExpert):
    CHOICES = {"side": tuple(CAN_SIDES), "carry": tuple(CAN_CARRY_Z), "place": ("lower", "drop")}
    side_gap = CAN_SIDE_GAP
    release_gap = 2 * CAN_RADIUS + 0.004  # the can is free

    def plan(self):
        lower = ("lower",) if self.strategy["place"] == "lower" else ()
        return self.GRASP_PHASES + ("lift", "carry") + lower + ("release",)

    def grasp_yaw(self, rs, u: np.ndarray) -> float:
        return CAN_GRASP_YAW

    def carry_z(self) -> float:
        return CAN_CARRY_Z[self.strategy["carry"]]

    def can(self, rs) -> np.ndarray:
        return rs.sim.data.body_xpos[rs.obj_body_id[rs.objects[rs.object_id].name]].copy()

    def grip_point(self, rs) -> np.ndarray:
        return self.can(rs) + [0, 0, CAN_HALF_HEIGHT - CAN_GRASP_BELOW_TOP]

    def grasp_geometry(self, rs):
        centre = self.can(rs)
        top = centre[2] + CAN_HALF_HEIGHT
        return centre, top, top - CAN_GRASP_BELOW_TOP, CAN_RADIUS, np.array(CAN_SIDES[self.strategy["side"]])

    def carry(self, rs):
        target = np.array([*CAN_PLACE_XY, self.carry_z()])
        if not self.holding(rs):
            self.goto(self.phases[0])
        elif np.linalg.norm((self.eef(rs)[0] - target)[:2]) < 0.015:
            self.advance()
        return target, down(self.gripper_yaw(rs)), CLOSE

    def lower(self, rs):
        target = np.array([*CAN_PLACE_XY, BIN_WALL_TOP + TIP_BELOW_SITE + CAN_LOWER_TO])
        return self.reach(rs, target, down(self.gripper_yaw(rs)), CLOSE, 0.005, axes=slice(2, 3))


class SquareExpert(Expert):
    CHOICES = {"handle": tuple(HANDLE_YAW), "carry": tuple(SQUARE_CARRY_Z), "release": tuple(NUT_RELEASE_Z)}
    release_gap = 0.06

    def reset(self, rs_env, strategy: dict | None = None) -> dict:
        self.flip = None  # grasp at gripper yaw = nut yaw + flip (0 or pi), chosen at the first approach step
        return super().reset(rs_env, strategy)

    def plan(self):
        return ("approach", "descend", "close", "lift", "carry", "align", "insert", "release")

    def carry_z(self) -> float:
        return SQUARE_CARRY_Z[self.strategy["carry"]]

    def nut(self, rs) -> tuple[np.ndarray, np.ndarray]:
        body = rs.obj_body_id[rs.nuts[rs.nut_id].name]
        return rs.sim.data.body_xpos[body].copy(), rs.sim.data.body_xmat[body].reshape(3, 3).copy()

    def grip_point(self, rs) -> np.ndarray:
        centre, R_nut = self.nut(rs)
        return centre + R_nut @ [NUT_GRIP_X, 0, 0]

    @staticmethod
    def turn(angle: float, q7: float) -> float:
        """The gripper turn angle + 2k pi of least size that keeps joint 7 (which turns against the yaw) in range."""
        options = wrap(angle) + np.array([0, -2 * np.pi, 2 * np.pi])
        feasible = options[np.abs(q7 - options) <= Q7_LIMIT]
        return feasible[np.argmin(np.abs(feasible))] if len(feasible) else options[np.argmin(np.abs(q7 - options))]

    def q7(self, rs) -> float:
        return rs.sim.data.qpos[rs.robots[0]._ref_joint_pos_indexes[-1]]

    def grasp_rotation(self, rs) -> np.ndarray:
        nut_yaw, now, q7 = yaw_of(self.nut(rs)[1]), self.gripper_yaw(rs), self.q7(rs)
        if self.flip is None:  # the side of the handle to grasp from: least turning, joint 7 in range
            costs = []
            for flip in (0.0, np.pi):
                grasp_turn = self.turn(nut_yaw + flip - now, q7)
                carry_turn = self.turn(HANDLE_YAW[self.strategy["handle"]] - nut_yaw, q7 - grasp_turn)
                worst = max(abs(q7 - grasp_turn), abs(q7 - grasp_turn - carry_turn))
                costs.append((worst > Q7_LIMIT, abs(grasp_turn) + abs(carry_turn)))
            self.flip = (0.0, np.pi)[costs.index(min(costs))]
        return self.toward(rs, now + self.turn(nut_yaw + self.flip - now, q7))

    def grasp_pose(self, rs):
        return self.grip_point(rs), self.grasp_rotation(rs)

    def approach(self, rs):
        grip, rot = self.grasp_pose(rs)
        return self.hover(rs, grip + [0, 0, NUT_HOVER], rot, OPEN)

    def descend(self, rs):
        return self.reach(rs, *self.grasp_pose(rs), OPEN, 0.006)

    def nut_target(self, rs, nut_z: float):
        """Grip-site target and rotation that bring the held nut over the peg at height nut_z, its handle
        turned to the chosen direction and the nut kept level (the gripper tilts against the nut's tilt).
        Also returns the nut's horizontal distance to the peg axis and the turn still to go."""
        p, _ = self.eef(rs)
        centre, R_nut = self.nut(rs)
        turn = self.turn(HANDLE_YAW[self.strategy["handle"]] - yaw_of(R_nut), self.q7(rs))
        offset = Rotation.from_rotvec([0, 0, turn]).as_matrix() @ (p - centre)  # grip site around the turned nut
        peg = rs.sim.data.body_xpos[rs.peg1_body_id]
        level = Rotation.align_vectors([[0, 0, 1]], [R_nut[:, 2]])[0].as_matrix()
        rot = level @ self.toward(rs, self.gripper_yaw(rs) + turn)
        return np.array([peg[0], peg[1], nut_z]) + offset, rot, np.linalg.norm((centre - peg)[:2]), turn

    def carry(self, rs):
        nut_z = self.carry_z() - (self.eef(rs)[0] - self.nut(rs)[0])[2]
        pos, rot, dist, turn = self.nut_target(rs, nut_z)
        if not self.holding(rs):
            self.goto(self.phases[0])
        elif dist < 0.01 and abs(turn) < 0.05:
            self.advance()
        return pos, rot, CLOSE

    def align(self, rs):
        nut_z = PEG_TOP + NUT_ALIGN_ABOVE_PEG + NUT_HALF_THICKNESS
        pos, rot, dist, _ = self.nut_target(rs, nut_z)
        if dist < NUT_CENTRE_TOL and self.nut(rs)[0][2] < nut_z + 0.005:
            self.advance()
        return pos, rot, CLOSE

    def insert(self, rs):
        nut_z = self.nut(rs)[0][2]
        if nut_z < NUT_RELEASE_Z[self.strategy["release"]]:
            self.advance()
        pos, rot, _, _ = self.nut_target(rs, nut_z - NUT_LOWER_STEP)
        return pos, rot, CLOSE


EXPERTS = {"lift": LiftExpert, "can": CanExpert, "square": SquareExpert}


def make_expert(task: str, rng: np.random.Generator, noise: float = 0.0, hesitate: float = 0.0,
                hover: float = HOVER, aside_descent: float = ASIDE_DESCENT) -> Expert:
    """hover, aside_descent: the side grasp's clearance (lift, can): fingertips this far above the object's
    top before stepping aside, and the descent speed while stepping aside relative to the lateral one."""
    if task not in EXPERTS:
        raise ValueError(f"no scripted expert for task {task!r}; choose from {sorted(EXPERTS)}")
    expert = EXPERTS[task](rng, noise=noise, hesitate=hesitate)
    if (hover, aside_descent) != (HOVER, ASIDE_DESCENT):
        if not isinstance(expert, SideGraspExpert):
            raise ValueError(f"hover and aside_descent apply to the side grasp of lift and can, not to {task}")
        expert.hover_height, expert.aside_descent = hover, aside_descent
    return expert


def run_episode(env, experts: list[Expert], seed: int, blend_key: str | None = None) -> tuple[bool, int]:
    """One episode in which the env executes the mean action of the experts (one expert: a plain demo).
    Every further expert's strategy differs from the first one's in `blend_key` (None: in any choice)."""
    env.reset(seed=seed)
    rs = env.unwrapped.rs_env
    first = experts[0].reset(rs)
    for expert in experts[1:]:
        expert.reset(rs, strategy=expert.draw_strategy(like=first, change=blend_key))
    steps, done, success = 0, False, False
    while not done:
        _, _, terminated, truncated, info = env.step(np.mean([e.act(rs) for e in experts], axis=0))
        steps, done, success = steps + 1, terminated or truncated, info["success"]
    return success, steps


if __name__ == "__main__":
    import environments

    parser = argparse.ArgumentParser(description="Success rate of the scripted experts (or of a blend of two).")
    parser.add_argument("--task", choices=sorted(EXPERTS), default="lift")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="episode i uses env seed and expert rng seed seed + i")
    parser.add_argument("--noise", type=float, default=0.0, help="std of the Gaussian noise on the arm actions")
    parser.add_argument("--hesitate", type=float, default=0.0, help="probability of a pause or overshoot per phase")
    parser.add_argument("--blend", nargs="?", const="any", default=None, metavar="KEY",
                        help="execute the mean action of two experts whose strategies differ in KEY (default: any choice)")
    args = parser.parse_args()

    env = environments.make_env(args.task, args.seed)
    blend_key = None if args.blend in (None, "any") else args.blend
    if blend_key is not None and blend_key not in EXPERTS[args.task].CHOICES:
        parser.error(f"--blend KEY for {args.task} is one of {list(EXPERTS[args.task].CHOICES)}")
    per_choice, successes, lengths = defaultdict(list), [], []
    start = time.time()
    for i in range(args.episodes):
        rng = np.random.default_rng(args.seed + i)
        experts = [make_expert(args.task, rng, args.noise, args.hesitate) for _ in range(1 + (args.blend is not None))]
        success, steps = run_episode(env, experts, args.seed + i, blend_key)
        successes.append(success), lengths.append(steps)
        for key in EXPERTS[args.task].CHOICES:  # per choice; blend: "first expert's + second expert's"
            per_choice[f"{key}={'+'.join(e.strategy[key] for e in experts)}"].append(success)
    elapsed = time.time() - start
    what = f"blend of two experts differing in {args.blend}" if args.blend else "expert"
    print(f"{args.task} {what}, noise {args.noise}, hesitate {args.hesitate}: success {np.mean(successes):.1%} over "
          f"{args.episodes} episodes (seeds {args.seed}..{args.seed + args.episodes - 1}), mean length "
          f"{np.mean(lengths):.1f} steps, {sum(lengths) / elapsed:.0f} steps/s")
    for label, outcomes in sorted(per_choice.items()):
        print(f"  {label:28s} {np.mean(outcomes):6.1%} of {len(outcomes)}")
