"""Generates a KuaiRand-Pure-format sample with real click / long-view / watch-time dependence.

The embedded sample in ``htl_jax/data/sample/kuairand/`` was made with

    python tools/make_kuairand_sample.py --out htl_jax/data/sample/kuairand

(the defaults: 40000 log rows, 1000 users, 800 videos, seed 0). For the preprocessing
benchmark, a KuaiRand-Pure-sized log:

    python tools/make_kuairand_sample.py --rows 1200000 --users 27285 --videos 7583 \\
        --out /tmp/kuairand_1m

It writes the three files of KuaiRand-Pure with the same names and all their columns
(docs/design.md): ``log_random_4_22_to_5_08_pure.csv``, ``user_features_pure.csv`` and
``video_features_basic_pure.csv``, with the real files' quirks: empty cells (missing
``onehot_feat*``, ``video_duration``, ``music_type``, ``tag``), the sentinel ``-124``
(``is_live_streamer`` and two ``video_duration`` values), multi-valued tags (``"2,28"``) and a
log sorted by user, not by time.

Generative process (deterministic given ``--seed``):

1. Users: a taste cluster ``c_u`` in 0..5, a bias ``b_u ~ N(0, 0.6)`` and an activity
   ``a_u ~ LogNormal(0, 0.8)``. Observed side features are noisy views of the latents:
   ``onehot_feat1`` = ``c_u`` (80 %, else random), ``user_active_degree`` from the activity
   quantile, ``onehot_feat2`` from the bias quantile; the other features are independent noise
   with KuaiRand-like cardinalities and ``*_range`` bins.
2. Videos: a topic cluster ``c_v`` in 0..5, a bias ``b_v ~ N(0, 0.6)``, a duration
   ``d ~ LogNormal(log 60 s, 0.7)`` clipped to [5 s, 300 s]. The first tag is drawn from the
   cluster's 3 tags, 30 % of videos get a second tag; authors are drawn from a per-cluster
   pool; ``AD`` videos (5 %) have a lower bias.
3. Exposures (the random log): a user drawn proportionally to activity, a video drawn
   uniformly, a date in 2022-04-22..2022-05-08, an hour from a diurnal profile, a tab.
4. Click: ``s = b_u + b_v + 1.2 A[c_u, c_v] + e_tab + e_hour - 0.2 (log d - log 60)
   - 0.5 [AD]`` with a 6 x 6 affinity ``A ~ N(0, 1)``; ``click ~ Bernoulli(sigmoid(s + o_1))``,
   the offset ``o_1`` solved by bisection so that the expected click rate is 17.62 %.
5. Long view, only if clicked: ``Bernoulli(sigmoid(0.8 (b_v + 1.2 A) + 0.5 b_u
   + 0.3 (log d - log 60) + o_2))``, ``o_2`` solved so that the overall rate is 8.50 %.
6. Watch time in seconds, 0 if not clicked, else ``min(d, exp(m + 0.7 log d + 1.8 long
   + 0.3 (b_v + 1.2 A) + 0.6 eps))`` with ``eps ~ N(0, 1)`` and ``m`` solved so that the mean
   over all rows is 6.94 s (the paper's Table 1). So watch time rises with long view and the
   same factors, is clipped at the duration and has a heavy (lognormal) tail.
7. The other feedback columns (likes, follows, comments, forwards, hates, profile and comment
   stay times) are rare events of clicked rows, generated only so that the files have every
   column; loaders must never use them as features.
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Callable

import numpy as np
import polars as pl

LOG_FILE = 'log_random_4_22_to_5_08_pure.csv'
USER_FILE = 'user_features_pure.csv'
VIDEO_FILE = 'video_features_basic_pure.csv'
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), '..', 'htl_jax', 'data', 'sample',
                           'kuairand')

CLICK_RATE, LONG_VIEW_RATE, MEAN_WATCH_S = 0.1762, 0.0850, 6.94
NUM_CLUSTERS = 6
FIRST_DAY = datetime.date(2022, 4, 22)
NUM_DAYS = 17
# Beijing time (UTC+8) midnight of FIRST_DAY in epoch milliseconds.
FIRST_DAY_MS = int(datetime.datetime(2022, 4, 22, tzinfo=datetime.timezone(
    datetime.timedelta(hours=8))).timestamp() * 1000)


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-z))


def _solve_offset(mean_of: Callable[[float], float], target: float) -> float:
  """Bisection for the offset ``o`` with ``mean_of(o) = target`` (``mean_of`` increasing)."""
  lo, hi = -20.0, 20.0
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if mean_of(mid) < target:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def _range_bins(values: np.ndarray, edges: list[int], labels: list[str]) -> np.ndarray:
  """KuaiRand-style ``*_range`` strings: ``labels[i]`` for ``edges[i-1] < v <= edges[i]``."""
  return np.asarray(labels)[np.searchsorted(np.asarray(edges), values, side='left')]


def _with_nulls(values: np.ndarray, rng: np.random.Generator, rate: float) -> pl.Series:
  series = pl.Series(values)
  return series.scatter(np.flatnonzero(rng.random(values.size) < rate), None)


def make_users(num_users: int, rng: np.random.Generator) -> tuple[pl.DataFrame, dict]:
  """User features table and the latent factors (step 1 of the module docstring)."""
  cluster = rng.integers(0, NUM_CLUSTERS, num_users)
  bias = rng.normal(0.0, 0.6, num_users)
  activity = rng.lognormal(0.0, 0.8, num_users)
  act_rank = np.argsort(np.argsort(activity)) / max(num_users - 1, 1)
  degree = np.where(act_rank > 0.6, 'full_active',
                    np.where(act_rank > 0.3, 'high_active', 'middle_active'))
  degree = np.where(rng.random(num_users) < 0.02, 'UNKNOWN', degree)
  live = rng.choice([0, 1, -124], size=num_users, p=[0.95, 0.03, 0.02])
  live[0] = -124  # the real file has this sentinel; make sure the sample does too
  follow = np.floor(rng.lognormal(3.0, 1.5, num_users)).astype(np.int64)
  fans = np.floor(rng.lognormal(1.5, 2.0, num_users)).astype(np.int64)
  friends = np.floor(rng.lognormal(0.5, 1.2, num_users)).astype(np.int64)
  register = rng.integers(8, 2500, num_users)
  columns = {
      'user_id': np.arange(num_users),
      'user_active_degree': degree,
      'is_lowactive_period': (rng.random(num_users) < 0.05).astype(np.int64),
      'is_live_streamer': live,
      'is_video_author': (rng.random(num_users) < 0.3).astype(np.int64),
      'follow_user_num': follow,
      'follow_user_num_range': _range_bins(
          follow, [0, 10, 50, 100, 150, 250, 500],
          ['0', '(0,10]', '(10,50]', '(50,100]', '(100,150]', '(150,250]', '(250,500]',
           '500+']),
      'fans_user_num': fans,
      'fans_user_num_range': _range_bins(
          fans, [0, 10, 100, 1000, 10000],
          ['0', '[1,10)', '[10,100)', '[100,1k)', '[1k,5k)', '[5k,1w)']),
      'friend_user_num': friends,
      'friend_user_num_range': _range_bins(
          friends, [0, 5, 30, 60, 120, 250],
          ['0', '[1,5)', '[5,30)', '[30,60)', '[60,120)', '[120,250)', '250+']),
      'register_days': register,
      'register_days_range': _range_bins(
          register, [30, 60, 90, 180, 365, 730],
          ['15-30', '31-60', '61-90', '91-180', '181-365', '366-730', '730+']),
  }
  noisy_cluster = np.where(rng.random(num_users) < 0.8, cluster,
                           rng.integers(0, NUM_CLUSTERS, num_users))
  bias_rank = np.argsort(np.argsort(bias)) * 5 // max(num_users, 1)
  cardinalities = [2, 7, 5, 40, 9, 2, 8, 3, 2, 20, 6, 3, 4, 2, 5, 3, 2, 3]
  for i, card in enumerate(cardinalities):
    if i == 1:
      values = noisy_cluster
    elif i == 2:
      values = bias_rank
    else:
      values = rng.integers(0, card, num_users)
    rate = 0.02 if i in (4, 7, 12) else 0.0
    columns[f'onehot_feat{i}'] = _with_nulls(values.astype(np.int64), rng, rate)
  latents = {'cluster': cluster, 'bias': bias, 'activity': activity}
  return pl.DataFrame(columns), latents


def make_videos(num_videos: int, rng: np.random.Generator) -> tuple[pl.DataFrame, dict]:
  """Video features table and the latent factors (step 2 of the module docstring)."""
  cluster = rng.integers(0, NUM_CLUSTERS, num_videos)
  is_ad = rng.random(num_videos) < 0.05
  bias = rng.normal(0.0, 0.6, num_videos) - 0.5 * is_ad
  duration_s = np.clip(rng.lognormal(np.log(60.0), 0.7, num_videos), 5.0, 300.0)
  duration_ms = np.round(duration_s * 1000.0 / 100.0) * 100.0
  cluster_tags = np.arange(NUM_CLUSTERS * 3).reshape(NUM_CLUSTERS, 3) * 2 + 1
  cluster_tags[0, 0] = 2  # tag 2 exists as a primary tag
  first = cluster_tags[cluster, rng.integers(0, 3, num_videos)]
  second = rng.integers(20, 40, num_videos)
  tags = np.where(rng.random(num_videos) < 0.3,
                  np.char.add(np.char.add(first.astype(str), ','), second.astype(str)),
                  first.astype(str)).astype(object)
  tags[rng.random(num_videos) < 0.03] = None
  tags[0], tags[1 % num_videos] = '2,28', '2'  # a multi-valued tag and its first tag alone
  cluster[0] = cluster[1 % num_videos] = 0
  authors_per_cluster = max(num_videos // (2 * NUM_CLUSTERS), 1)
  author = cluster * authors_per_cluster + rng.integers(0, authors_per_cluster, num_videos)
  age_days = rng.integers(0, 330, num_videos)
  upload = [(FIRST_DAY - datetime.timedelta(days=int(a))).isoformat() for a in age_days]
  shapes = np.array([(720, 1280), (1080, 1920), (576, 1024), (1280, 720), (540, 960)])
  shape = shapes[rng.choice(len(shapes), num_videos, p=[0.5, 0.25, 0.1, 0.1, 0.05])]
  duration_col = duration_ms.copy()
  duration_col[rng.random(num_videos) < 0.03] = np.nan
  duration_col[[2 % num_videos, 3 % num_videos]] = -124.0
  columns = {
      'video_id': np.arange(num_videos),
      'author_id': author,
      'video_type': np.where(is_ad, 'AD', 'NORMAL'),
      'upload_dt': upload,
      'upload_type': rng.choice(
          ['ShortImport', 'LongImport', 'Web', 'ShortCamera', 'LongCamera', 'PictureSet'],
          size=num_videos, p=[0.4, 0.15, 0.05, 0.25, 0.1, 0.05]),
      'visible_status': rng.choice([0, 1, 4], size=num_videos, p=[0.9, 0.07, 0.03]),
      'video_duration': pl.Series(duration_col).fill_nan(None),
      'server_width': shape[:, 0],
      'server_height': shape[:, 1],
      'music_id': 100000 + rng.integers(0, max(num_videos // 2, 1), num_videos),
      'music_type': _with_nulls(rng.choice([1, 3, 4, 8, 9, 11], size=num_videos), rng, 0.05),
      'tag': pl.Series(tags, dtype=pl.String),
  }
  latents = {'cluster': cluster, 'bias': bias, 'duration_ms': duration_ms, 'is_ad': is_ad}
  return pl.DataFrame(columns), latents


def make_log(rows: int, users: dict, videos: dict, rng: np.random.Generator) -> pl.DataFrame:
  """The random-exposure log with its feedback columns (steps 3-7 of the module docstring)."""
  num_users, num_videos = users['bias'].size, videos['bias'].size
  user = rng.choice(num_users, size=rows, p=users['activity'] / users['activity'].sum())
  video = rng.integers(0, num_videos, rows)
  day = rng.integers(0, NUM_DAYS, rows)
  diurnal = np.array([2, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 6, 5, 5, 5, 5, 6, 7, 8, 9, 9, 7, 4],
                     dtype=np.float64)
  hour = rng.choice(24, size=rows, p=diurnal / diurnal.sum())
  tab = rng.choice(15, size=rows, p=np.r_[0.55, 0.25, 0.08, 0.04, np.full(11, 0.08 / 11)])
  affinity = rng.normal(0.0, 1.0, (NUM_CLUSTERS, NUM_CLUSTERS))
  tab_effect = rng.normal(0.0, 0.3, 15)
  hour_effect = 0.3 * np.sin(2 * np.pi * (hour - 20) / 24.0)
  log_d = np.log(videos['duration_ms'][video] / 1000.0) - np.log(60.0)
  taste = 1.2 * affinity[users['cluster'][user], videos['cluster'][video]]
  score = (users['bias'][user] + videos['bias'][video] + taste + tab_effect[tab]
           + hour_effect - 0.2 * log_d)
  click_offset = _solve_offset(lambda o: float(_sigmoid(score + o).mean()), CLICK_RATE)
  click = rng.random(rows) < _sigmoid(score + click_offset)
  view_score = 0.8 * (videos['bias'][video] + taste) + 0.5 * users['bias'][user] + 0.3 * log_d
  click_p = _sigmoid(score + click_offset)
  long_offset = _solve_offset(
      lambda o: float((click_p * _sigmoid(view_score + o)).mean()), LONG_VIEW_RATE)
  long_view = click & (rng.random(rows) < _sigmoid(view_score + long_offset))
  duration_s = videos['duration_ms'][video] / 1000.0
  log_watch = (0.7 * np.log(duration_s) + 1.8 * long_view
               + 0.3 * (videos['bias'][video] + taste) + 0.6 * rng.normal(size=rows))

  def mean_watch(m: float) -> float:
    return float(np.where(click, np.minimum(np.exp(m + log_watch), duration_s), 0.0).mean())

  watch_offset = _solve_offset(mean_watch, MEAN_WATCH_S)
  watch_s = np.where(click, np.minimum(np.exp(watch_offset + log_watch), duration_s), 0.0)
  play_time_ms = np.round(watch_s * 1000.0).astype(np.int64)

  def rare(p: float) -> np.ndarray:
    return (click & (rng.random(rows) < p)).astype(np.int64)

  profile_enter = rare(0.02)
  comment = rare(0.01)
  dates = np.array([int((FIRST_DAY + datetime.timedelta(days=d)).strftime('%Y%m%d'))
                    for d in range(NUM_DAYS)])
  time_ms = (FIRST_DAY_MS + day * 86_400_000 + hour * 3_600_000
             + rng.integers(0, 3_600_000, rows))
  log = pl.DataFrame({
      'user_id': user,
      'video_id': video,
      'date': dates[day],
      'hourmin': hour * 100,
      'time_ms': time_ms,
      'is_click': click.astype(np.int64),
      'is_like': rare(0.06),
      'is_follow': rare(0.004),
      'is_comment': comment,
      'is_forward': rare(0.003),
      'is_hate': (rng.random(rows) < 0.0005).astype(np.int64),
      'long_view': long_view.astype(np.int64),
      'play_time_ms': play_time_ms,
      'duration_ms': videos['duration_ms'][video].astype(np.int64),
      'profile_stay_time': profile_enter * rng.integers(1, 60, rows),
      'comment_stay_time': comment * rng.integers(1, 120, rows),
      'is_profile_enter': profile_enter,
      'is_rand': np.ones(rows, np.int64),
      'tab': tab,
  })
  return log.sort(['user_id', 'time_ms'])


def make_sample(out: str, rows: int, num_users: int, num_videos: int, seed: int) -> None:
  """Writes the three KuaiRand-Pure files into ``out``."""
  rng = np.random.default_rng(seed)
  user_table, users = make_users(num_users, rng)
  video_table, videos = make_videos(num_videos, rng)
  log = make_log(rows, users, videos, rng)
  os.makedirs(out, exist_ok=True)
  log.write_csv(os.path.join(out, LOG_FILE))
  user_table.write_csv(os.path.join(out, USER_FILE))
  video_table.write_csv(os.path.join(out, VIDEO_FILE))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--rows', type=int, default=40000, help='log rows')
  parser.add_argument('--users', type=int, default=1000)
  parser.add_argument('--videos', type=int, default=800)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=DEFAULT_OUT, help='output directory')
  args = parser.parse_args()
  make_sample(args.out, args.rows, args.users, args.videos, args.seed)
  print(f'wrote {args.rows} log rows, {args.users} users, {args.videos} videos to {args.out}')


if __name__ == '__main__':
  main()
