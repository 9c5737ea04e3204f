#include "train/plots.h"

#include "tensor/file_io.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

namespace mmdit {
namespace {

const char* kFont = "font-family=\"Helvetica, Arial, sans-serif\"";

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// Pixel coordinates: a tenth of a pixel is finer than any renderer resolves, and keeps files
// with thousands of points small.
std::string px(double v) {
  return fmt("%.1f", v);
}

std::string escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += ch;
    }
  }
  return out;
}

void text(std::ostringstream& o, double x, double y, const std::string& s, int size,
          const char* anchor = "start", const char* extra = "") {
  o << "<text x=\"" << px(x) << "\" y=\"" << px(y) << "\" font-size=\"" << size
    << "\" text-anchor=\"" << anchor << "\" " << kFont << " " << extra << ">" << escape(s)
    << "</text>\n";
}

void line(std::ostringstream& o, double x1, double y1, double x2, double y2, const char* style) {
  o << "<line x1=\"" << px(x1) << "\" y1=\"" << px(y1) << "\" x2=\"" << px(x2) << "\" y2=\""
    << px(y2) << "\" " << style << "/>\n";
}

// A tick spacing of 1, 2 or 5 times a power of ten giving about `target` ticks over `range`.
double nice_step(double range, int target) {
  const double raw = range / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * mag;
}

// A tick label without trailing zeros; scientific only for very large or small values.
std::string number_label(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  if (a >= 1e-3 && a < 1e6) {
    std::string s = fmt("%.6f", v);
    s.erase(s.find_last_not_of('0') + 1);
    if (s.back() == '.') s.pop_back();
    return s;
  }
  return fmt("%.0e", v);
}

std::string step_label(double v) {
  if (std::abs(v) >= 1e6) return fmt("%.3g", v);
  return number_label(v);
}

}  // namespace

LossHistory::LossHistory(size_t capacity) : capacity_(capacity) {
  if (capacity < 2) throw Error(str_cat("LossHistory: capacity ", capacity, " is below 2"));
  buckets_.reserve(capacity);
}

void LossHistory::add(int64_t step, double loss) {
  if (last_step_ && step <= *last_step_)
    throw Error(str_cat("LossHistory: step ", step, " comes after step ", *last_step_,
                        "; steps must increase"));
  last_step_ = step;
  if (!(std::isfinite(loss) && loss > 0)) {
    ++omitted_;
    return;
  }
  const double y = std::log10(loss);
  if (buckets_.empty() || y < lowest_.second) lowest_ = {step, y};
  last_ = {step, y};
  if (!buckets_.empty() && buckets_.back().count < steps_per_bucket_) {
    Bucket& b = buckets_.back();
    b.last_step = step;
    if (y < b.low) b.low = y, b.low_step = step;
    if (y > b.high) b.high = y, b.high_step = step;
    b.log_sum += y;
    ++b.count;
    return;
  }
  if (buckets_.size() == capacity_) halve();
  buckets_.push_back({step, step, step, step, y, y, y, 1});
}

void LossHistory::halve() {
  size_t kept = 0;
  for (size_t i = 0; i < buckets_.size(); i += 2, ++kept) {
    Bucket merged = buckets_[i];
    if (i + 1 < buckets_.size()) {
      const Bucket& next = buckets_[i + 1];
      merged.last_step = next.last_step;
      if (next.low < merged.low) merged.low = next.low, merged.low_step = next.low_step;
      if (next.high > merged.high) merged.high = next.high, merged.high_step = next.high_step;
      merged.log_sum += next.log_sum;
      merged.count += next.count;
    }
    buckets_[kept] = merged;
  }
  buckets_.resize(kept);
  steps_per_bucket_ *= 2;
}

int64_t LossHistory::points() const {
  int64_t n = 0;
  for (const Bucket& b : buckets_) n += b.count;
  return n;
}

void write_loss_curve_svg(const std::string& path,
                          const std::vector<std::pair<int64_t, double>>& step_loss,
                          const std::string& title) {
  std::vector<std::pair<int64_t, double>> sorted = step_loss;
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  LossHistory history;
  for (const auto& [step, loss] : sorted) {
    if (history.has_step() && step == history.last_step())
      throw Error(str_cat("write_loss_curve_svg: step ", step, " has two losses"));
    history.add(step, loss);
  }
  write_loss_curve_svg(path, history, title);
}

void write_loss_curve_svg(const std::string& path, const LossHistory& history,
                          const std::string& title) {
  const double W = 720, H = 440, L = 84, R = 28, T = 62, B = 56;
  const double pw = W - L - R, ph = H - T - B;

  // The raw curve: each bucket's lowest and highest loss in step order (one point for one step).
  std::vector<std::pair<double, double>> pts;  // (step, log10 loss)
  for (const LossHistory::Bucket& b : history.buckets()) {
    const std::pair<double, double> low{static_cast<double>(b.low_step), b.low},
        high{static_cast<double>(b.high_step), b.high};
    if (b.count == 1 || b.low_step == b.high_step) {
      pts.push_back(low);
    } else {
      pts.push_back(b.low_step < b.high_step ? low : high);
      pts.push_back(b.low_step < b.high_step ? high : low);
    }
  }
  const int64_t points = history.points();
  const int64_t omitted = history.omitted();
  double x0 = 0, x1 = 1, y0 = -1, y1 = 0;
  if (!pts.empty()) {
    x0 = static_cast<double>(history.buckets().front().first_step);
    x1 = static_cast<double>(history.buckets().back().last_step);
    y0 = y1 = pts.front().second;
    for (const auto& p : pts) y0 = std::min(y0, p.second), y1 = std::max(y1, p.second);
  }
  if (x1 - x0 < 1) x0 -= 1, x1 += 1;  // one step: centre it
  if (y1 - y0 < 0.3) {
    const double mid = (y0 + y1) / 2;  // a flat curve: show it mid-height, about a decade tall
    y0 = mid - 0.5, y1 = mid + 0.5;
  } else {
    const double pad = 0.05 * (y1 - y0);
    y0 -= pad, y1 += pad;
  }
  auto sx = [&](double x) { return L + (x - x0) / (x1 - x0) * pw; };
  auto sy = [&](double ly) { return T + (y1 - ly) / (y1 - y0) * ph; };

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" viewBox=\"0 0 " << W << " " << H << "\">\n";
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << pw << "\" height=\"" << ph
    << "\" fill=\"#fafafa\" stroke=\"none\"/>\n";
  text(o, W / 2, 26, title, 17, "middle", "font-weight=\"bold\"");

  // y grid: decades, with 2x and 5x labelled too when fewer than three decades are in view,
  // minor lines at the other integers between decades.
  const int d0 = static_cast<int>(std::floor(y0)), d1 = static_cast<int>(std::ceil(y1));
  int decades_in_view = 0;
  for (int d = d0; d <= d1; ++d) decades_in_view += d >= y0 && d <= y1;
  for (int d = d0; d <= d1; ++d) {
    for (int k = 1; k <= 9; ++k) {
      const double ly = d + std::log10(static_cast<double>(k));
      if (ly < y0 || ly > y1) continue;
      const bool labelled = k == 1 || (decades_in_view < 3 && (k == 2 || k == 5));
      if (!labelled && d1 - d0 > 8) continue;  // too dense to help
      line(o, L, sy(ly), L + pw, sy(ly),
           labelled ? "stroke=\"#dddddd\" stroke-width=\"1\""
                    : "stroke=\"#eeeeee\" stroke-width=\"0.7\"");
      if (labelled) {
        line(o, L - 5, sy(ly), L, sy(ly), "stroke=\"#333\"");
        text(o, L - 8, sy(ly) + 4, number_label(k * std::pow(10.0, d)), 12, "end");
      }
    }
  }
  // x grid.
  const double xs = std::max(1.0, nice_step(x1 - x0, 6));
  for (double x = std::ceil(x0 / xs) * xs; x <= x1 + 1e-9; x += xs) {
    line(o, sx(x), T, sx(x), T + ph, "stroke=\"#eeeeee\" stroke-width=\"1\"");
    line(o, sx(x), T + ph, sx(x), T + ph + 5, "stroke=\"#333\"");
    text(o, sx(x), T + ph + 19, step_label(x), 12, "middle");
  }
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << pw << "\" height=\"" << ph
    << "\" fill=\"none\" stroke=\"#333\" stroke-width=\"1\"/>\n";
  text(o, L + pw / 2, H - 12, "step", 13, "middle");
  text(o, 18, T + ph / 2, "loss (log scale)", 13, "middle",
       str_cat("transform=\"rotate(-90 18 ", px(T + ph / 2), ")\"").c_str());

  const auto by_loss = [](const auto& a, const auto& b) { return a.second < b.second; };
  std::string subtitle;
  if (pts.empty()) {
    text(o, L + pw / 2, T + ph / 2, "no positive loss values to plot", 14, "middle",
         "fill=\"#888\"");
  } else {
    const auto [last_step, last] = history.last();
    const auto [lowest_step, lowest] = history.lowest();
    subtitle = str_cat("last ", fmt("%.4g", std::pow(10.0, last)), " at step ",
                       step_label(static_cast<double>(last_step)), "  \u00b7  min ",
                       fmt("%.4g", std::pow(10.0, lowest)), " at step ",
                       step_label(static_cast<double>(lowest_step)));
  }
  if (omitted > 0)
    subtitle += str_cat(subtitle.empty() ? "" : "  \u00b7  ", "(", omitted,
                        " non-positive or non-finite values omitted)");
  text(o, W / 2, 46, subtitle, 12, "middle", "fill=\"#555\"");

  // Every step of a long run would make a file of megabytes (12 bytes a point, 24 a step with the
  // moving average) that no screen resolves: past two points per pixel column, each column's points
  // are drawn as their lowest and highest, in step order, which keeps the band the curve covers.
  auto polyline = [&](const std::vector<std::pair<double, double>>& p, const char* style) {
    o << "<polyline " << style << " fill=\"none\" stroke-linejoin=\"round\" points=\"";
    const auto point = [&](const std::pair<double, double>& q) {
      o << px(sx(q.first)) << "," << px(sy(q.second)) << " ";
    };
    const size_t columns = static_cast<size_t>(pw);
    if (p.size() <= 2 * columns) {
      for (const auto& q : p) point(q);
    } else {
      for (size_t c = 0, begin = 0; c < columns; ++c) {
        const size_t end = (c + 1) * p.size() / columns;
        const auto [low, high] = std::minmax_element(p.begin() + begin, p.begin() + end, by_loss);
        point(low < high ? *low : *high);
        point(low < high ? *high : *low);
        begin = end;
      }
    }
    o << "\"/>\n";
  };
  // Noisy per-step losses are hard to read raw; a centred moving average (in log space, where
  // the noise is roughly symmetric) shows the trend over the faint raw curve without the lag
  // an exponential average would add.
  const bool smooth = points >= 20;
  if (pts.size() > 1)
    polyline(pts, smooth ? "class=\"loss\" stroke=\"#9ecae1\" stroke-width=\"1\""
                         : "class=\"loss\" stroke=\"#1f77b4\" stroke-width=\"2\"");
  if (smooth) {
    // Over about a fiftieth of the run either side; a bucket weighs as the steps it holds.
    const std::vector<LossHistory::Bucket>& buckets = history.buckets();
    const int64_t n = static_cast<int64_t>(buckets.size());
    const int64_t half = std::max<int64_t>(1, n / 50);
    std::vector<double> log_sums(n + 1, 0.0), counts(n + 1, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      log_sums[i + 1] = log_sums[i] + buckets[i].log_sum;
      counts[i + 1] = counts[i] + static_cast<double>(buckets[i].count);
    }
    std::vector<std::pair<double, double>> avg(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t lo = std::max<int64_t>(0, i - half), hi = std::min(n, i + half + 1);
      avg[i] = {(buckets[i].first_step + buckets[i].last_step) / 2.0,
                (log_sums[hi] - log_sums[lo]) / (counts[hi] - counts[lo])};
    }
    polyline(avg, "class=\"loss-smoothed\" stroke=\"#08519c\" stroke-width=\"2\"");
    const double lx = L + pw - 214, ly = T + 16;
    o << "<rect x=\"" << px(lx - 8) << "\" y=\"" << px(ly - 11) << "\" width=\"214\" "
      << "height=\"22\" fill=\"white\" fill-opacity=\"0.85\" stroke=\"#ddd\"/>\n";
    line(o, lx, ly, lx + 22, ly, "stroke=\"#9ecae1\" stroke-width=\"2\"");
    text(o, lx + 28, ly + 4, "loss", 12);
    line(o, lx + 70, ly, lx + 92, ly, "stroke=\"#08519c\" stroke-width=\"2\"");
    text(o, lx + 98, ly + 4, "moving average", 12);
  }
  if (points <= 30)
    for (const auto& [x, ly] : pts)
      o << "<circle cx=\"" << px(sx(x)) << "\" cy=\"" << px(sy(ly))
        << "\" r=\"3\" fill=\"#1f77b4\"/>\n";
  o << "</svg>\n";
  write_file_atomically(path, o.str());
}

void write_rollouts_svg(const std::string& path, const DemoTaskConfig& task,
                        const DemoTask::Demos& demos,
                        const std::vector<std::vector<std::array<float, 2>>>& rollouts,
                        const std::vector<bool>& success, const std::string& title) {
  MMDIT_CHECK(rollouts.size() == success.size(), "write_rollouts_svg: ", rollouts.size(),
              " rollouts but ", success.size(), " success flags");
  std::vector<std::vector<std::array<float, 2>>> expert;
  if (demos.states.defined()) {
    MMDIT_CHECK(demos.states.dim() == 2 && demos.states.size(1) >= 2 && demos.actions.defined() &&
                    demos.actions.shape() == Shape({demos.states.size(0), 2}) &&
                    !demos.episode_starts.empty() &&
                    demos.episode_starts.back() == demos.states.size(0),
                "write_rollouts_svg: inconsistent demos: states ", shape_str(demos.states.shape()),
                ", ", demos.episode_starts.size(), " episode starts");
    const auto s = demos.states.to_vector<float>(), a = demos.actions.to_vector<float>();
    const int64_t sd = demos.states.size(1);
    for (size_t e = 0; e + 1 < demos.episode_starts.size(); ++e) {
      const int64_t b = demos.episode_starts[e], end = demos.episode_starts[e + 1];
      if (end <= b) continue;
      auto& path_e = expert.emplace_back();
      for (int64_t t = b; t < end; ++t) path_e.push_back({s[t * sd], s[t * sd + 1]});
      // The state reached by the last action is not recorded; add it so paths end at the goal.
      path_e.push_back(
          {s[(end - 1) * sd] + a[(end - 1) * 2], s[(end - 1) * sd + 1] + a[(end - 1) * 2 + 1]});
    }
  }

  // World window: the task's geometry (both expert detours included) and whatever was drawn,
  // but at most `reach` beyond the geometry, so that one rollout flying off does not shrink
  // the task to a dot; what lies outside is clipped. x and y share one scale so that the
  // obstacle stays round.
  double gx0 = std::min({task.start[0] - task.start_jitter, task.goal[0] - task.success_radius,
                         task.obstacle_center[0] - task.obstacle_radius});
  double gx1 = std::max({task.start[0] + task.start_jitter, task.goal[0] + task.success_radius,
                         task.obstacle_center[0] + task.obstacle_radius});
  double gy0 = std::min({task.start[1] - task.start_jitter, task.goal[1] - task.success_radius,
                         task.obstacle_center[1] - task.obstacle_radius});
  double gy1 = std::max({task.start[1] + task.start_jitter, task.goal[1] + task.success_radius,
                         task.obstacle_center[1] + task.obstacle_radius});
  {
    const double ax = task.goal[0] - task.start[0], ay = task.goal[1] - task.start[1];
    const double len = std::hypot(ax, ay);
    for (int side : {-1, 1})
      for (int i = 0; i <= 50 && len > 0; ++i) {
        const double u = i / 50.0, off = side * task.expert_detour * std::sin(M_PI * u);
        const double x = task.start[0] + u * ax + off * ay / len;
        const double y = task.start[1] + u * ay - off * ax / len;
        gx0 = std::min(gx0, x), gx1 = std::max(gx1, x), gy0 = std::min(gy0, y);
        gy1 = std::max(gy1, y);
      }
  }
  double wx0 = gx0, wx1 = gx1, wy0 = gy0, wy1 = gy1;
  const double reach = 0.5 * std::max(gx1 - gx0, gy1 - gy0);
  auto include = [&](const std::vector<std::vector<std::array<float, 2>>>& paths) {
    for (const auto& path_i : paths)
      for (const auto& q : path_i) {
        if (!std::isfinite(q[0]) || !std::isfinite(q[1])) continue;
        wx0 = std::min(wx0, std::max<double>(q[0], gx0 - reach));
        wx1 = std::max(wx1, std::min<double>(q[0], gx1 + reach));
        wy0 = std::min(wy0, std::max<double>(q[1], gy0 - reach));
        wy1 = std::max(wy1, std::min<double>(q[1], gy1 + reach));
      }
  };
  include(expert);
  include(rollouts);
  if (std::max(wx1 - wx0, wy1 - wy0) < 1e-9) wx0 -= 1, wx1 += 1, wy0 -= 1, wy1 += 1;
  const double margin = 0.08 * std::max(wx1 - wx0, wy1 - wy0);
  wx0 -= margin, wx1 += margin, wy0 -= margin, wy1 += margin;

  const double scale = 560 / std::max(wx1 - wx0, wy1 - wy0);  // pixels per world unit
  const double PW = std::max(260.0, (wx1 - wx0) * scale), PH = (wy1 - wy0) * scale;
  {
    const double cx = (wx0 + wx1) / 2, half = PW / scale / 2;  // widen to the minimum width
    wx0 = cx - half, wx1 = cx + half;
  }
  const double L = 56, T = 70, LEG = 220, W = L + PW + 28 + LEG, H = T + PH + 44;
  auto sx = [&](double x) { return L + (x - wx0) * scale; };
  auto sy = [&](double y) { return T + (wy1 - y) * scale; };

  int64_t n_success = 0;
  for (bool b : success) n_success += b;
  const int64_t n_fail = static_cast<int64_t>(success.size()) - n_success;

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" viewBox=\"0 0 " << W << " " << H << "\">\n";
  o << "<defs><clipPath id=\"plot-area\"><rect x=\"" << L << "\" y=\"" << T << "\" width=\""
    << px(PW) << "\" height=\"" << px(PH) << "\"/></clipPath></defs>\n";
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << px(PW) << "\" height=\"" << px(PH)
    << "\" fill=\"#fbfbf8\"/>\n";
  text(o, W / 2, 28, title, 17, "middle", "font-weight=\"bold\"");
  if (!rollouts.empty())
    text(o, W / 2, 50,
         str_cat("success ", fmt("%.0f", 100.0 * n_success / rollouts.size()), "% (", n_success,
                 " of ", rollouts.size(), " rollouts)"),
         13, "middle", "fill=\"#444\"");

  // Grid and axis labels in world units.
  const double gs = nice_step(std::max(wx1 - wx0, wy1 - wy0), 6);
  for (double g = std::ceil(wx0 / gs) * gs; g <= wx1 + 1e-9; g += gs) {
    line(o, sx(g), T, sx(g), T + PH, "stroke=\"#ececec\"");
    text(o, sx(g), T + PH + 17, number_label(std::abs(g) < 1e-9 ? 0 : g), 11, "middle",
         "fill=\"#666\"");
  }
  for (double g = std::ceil(wy0 / gs) * gs; g <= wy1 + 1e-9; g += gs) {
    line(o, L, sy(g), L + PW, sy(g), "stroke=\"#ececec\"");
    text(o, L - 6, sy(g) + 4, number_label(std::abs(g) < 1e-9 ? 0 : g), 11, "end", "fill=\"#666\"");
  }
  text(o, L + PW / 2, T + PH + 36, "x", 12, "middle", "fill=\"#444\"");
  text(o, 16, T + PH / 2, "y", 12, "middle", "fill=\"#444\"");

  o << "<g clip-path=\"url(#plot-area)\">\n";
  // Start region, goal region, obstacle.
  o << "<rect class=\"start-region\" x=\"" << px(sx(task.start[0] - task.start_jitter)) << "\" y=\""
    << px(sy(task.start[1] + task.start_jitter)) << "\" width=\""
    << px(2 * task.start_jitter * scale) << "\" height=\"" << px(2 * task.start_jitter * scale)
    << "\" fill=\"#cfe3f7\" fill-opacity=\"0.7\" stroke=\"#4a86c5\" stroke-dasharray=\"4 3\"/>\n";
  o << "<circle class=\"goal\" cx=\"" << px(sx(task.goal[0])) << "\" cy=\"" << px(sy(task.goal[1]))
    << "\" r=\"" << px(task.success_radius * scale)
    << "\" fill=\"#ffe08a\" fill-opacity=\"0.8\" stroke=\"#c99700\" stroke-width=\"1.5\"/>\n";
  o << "<circle class=\"obstacle\" cx=\"" << px(sx(task.obstacle_center[0])) << "\" cy=\""
    << px(sy(task.obstacle_center[1])) << "\" r=\"" << px(task.obstacle_radius * scale)
    << "\" fill=\"#5f6368\" stroke=\"#303134\" stroke-width=\"1.5\"/>\n";

  auto polyline = [&](const std::vector<std::array<float, 2>>& p, const std::string& attrs) {
    o << "<polyline " << attrs << " fill=\"none\" stroke-linejoin=\"round\" "
      << "stroke-linecap=\"round\" points=\"";
    for (const auto& q : p)
      if (std::isfinite(q[0]) && std::isfinite(q[1]))
        o << px(sx(q[0])) << "," << px(sy(q[1])) << " ";
    o << "\"/>\n";
  };
  // Fainter the more there are, so that a few hundred demos read as a density, not a blot.
  const double expert_opacity = std::clamp(12.0 / std::max<size_t>(expert.size(), 1), 0.12, 0.6);
  for (const auto& e : expert)
    polyline(e, str_cat("class=\"expert\" stroke=\"#777\" stroke-width=\"1\" stroke-opacity=\"",
                        fmt("%.2f", expert_opacity), "\""));
  // Failures last, so that they are not hidden under the many successes.
  for (bool pass : {true, false})
    for (size_t i = 0; i < rollouts.size(); ++i) {
      if (success[i] != pass || rollouts[i].empty()) continue;
      const char* colour = pass ? "#2e9d4a" : "#d62728";
      polyline(rollouts[i],
               str_cat("class=\"rollout ", pass ? "success" : "failure", "\" stroke=\"", colour,
                       "\" stroke-width=\"1.8\" stroke-opacity=\"0.8\""));
      const auto& end = rollouts[i].back();
      if (!std::isfinite(end[0]) || !std::isfinite(end[1])) continue;
      o << "<circle class=\"rollout-end\" cx=\"" << px(sx(end[0])) << "\" cy=\"" << px(sy(end[1]))
        << "\" r=\"2.5\" fill=\"" << colour << "\"/>\n";
    }
  o << "</g>\n";
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << px(PW) << "\" height=\"" << px(PH)
    << "\" fill=\"none\" stroke=\"#333\"/>\n";
  // Labels next to the landmarks, outside the clip so they are never cut.
  text(o, sx(task.goal[0]) + task.success_radius * scale + 6, sy(task.goal[1]) + 4, "goal", 12,
       "start", "fill=\"#8a6a00\"");
  // Below the start box: beside it, the paths leaving it would run through the label.
  text(o, sx(task.start[0]), sy(task.start[1] - task.start_jitter) + 15, "start", 12, "middle",
       "fill=\"#2f5f91\"");

  // Legend.
  const double lx = L + PW + 28;
  double ly = T + 8;
  text(o, lx, ly + 4, "Legend", 13, "start", "font-weight=\"bold\"");
  ly += 24;
  auto legend_line = [&](const char* colour, double width, const std::string& label) {
    line(o, lx, ly, lx + 28, ly,
         str_cat("stroke=\"", colour, "\" stroke-width=\"", width, "\"").c_str());
    text(o, lx + 36, ly + 4, label, 12);
    ly += 22;
  };
  if (!expert.empty()) legend_line("#999", 1.5, str_cat("expert demo (", expert.size(), ")"));
  if (!rollouts.empty()) {
    legend_line("#2e9d4a", 2.5, str_cat("rollout: success (", n_success, ")"));
    legend_line("#d62728", 2.5, str_cat("rollout: failure (", n_fail, ")"));
  }
  o << "<circle cx=\"" << lx + 14 << "\" cy=\"" << ly << "\" r=\"8\" fill=\"#5f6368\"/>\n";
  text(o, lx + 36, ly + 4, "obstacle", 12);
  ly += 24;
  o << "<circle cx=\"" << lx + 14 << "\" cy=\"" << ly
    << "\" r=\"8\" fill=\"#ffe08a\" stroke=\"#c99700\" stroke-width=\"1.5\"/>\n";
  text(o, lx + 36, ly + 4, "goal region", 12);
  ly += 24;
  o << "<rect x=\"" << lx + 6 << "\" y=\"" << ly - 8
    << "\" width=\"16\" height=\"16\" fill=\"#cfe3f7\" stroke=\"#4a86c5\" "
       "stroke-dasharray=\"4 3\"/>\n";
  text(o, lx + 36, ly + 4, "start region", 12);
  o << "</svg>\n";
  write_file_atomically(path, o.str());
}

}  // namespace mmdit
