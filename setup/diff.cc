#include "setup/diff.h"

#include <algorithm>
#include <vector>

namespace ibdisk::setup {
namespace {

constexpr int kContext = 3;

struct Line {
  std::string text;
  bool no_newline = false;
};

std::vector<Line> lines_of(const std::string& s) {
  std::vector<Line> out;
  std::size_t pos = 0;
  while (pos < s.size()) {
    const auto nl = s.find('\n', pos);
    if (nl == std::string::npos) {
      out.push_back({s.substr(pos), true});
      break;
    }
    out.push_back({s.substr(pos, nl - pos), false});
    pos = nl + 1;
  }
  return out;
}

bool same(const Line& a, const Line& b) { return a.text == b.text && a.no_newline == b.no_newline; }

// One edit-script entry: ' ' keep, '-' delete from old, '+' insert from new.
struct Op {
  char kind;
  int old_idx, new_idx;
};

// Longest common subsequence by dynamic programming: configuration files are small.
std::vector<Op> edit_script(const std::vector<Line>& a, const std::vector<Line>& b) {
  const std::size_t n = a.size(), m = b.size();
  std::vector<std::vector<int>> lcs(n + 1, std::vector<int>(m + 1, 0));
  for (std::size_t i = n; i-- > 0;) {
    for (std::size_t j = m; j-- > 0;) {
      lcs[i][j] = same(a[i], b[j]) ? lcs[i + 1][j + 1] + 1 : std::max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  std::vector<Op> ops;
  std::size_t i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && same(a[i], b[j])) {
      ops.push_back({' ', static_cast<int>(i++), static_cast<int>(j++)});
    } else if (i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1])) {
      ops.push_back({'-', static_cast<int>(i++), static_cast<int>(j)});
    } else {
      ops.push_back({'+', static_cast<int>(i), static_cast<int>(j++)});
    }
  }
  return ops;
}

std::string range(int start, int count) {
  // diff -u: a hunk of zero lines is "start,0" where start is the line before it.
  if (count == 0) return std::to_string(start) + ",0";
  if (count == 1) return std::to_string(start + 1);
  return std::to_string(start + 1) + "," + std::to_string(count);
}

}  // namespace

std::string unified_diff(const std::string& old_text, const std::string& new_text, const std::string& old_label,
                         const std::string& new_label) {
  if (old_text == new_text) return {};
  const auto a = lines_of(old_text), b = lines_of(new_text);
  const auto ops = edit_script(a, b);
  std::string out = "--- " + old_label + "\n+++ " + new_label + "\n";
  std::size_t k = 0;
  while (k < ops.size()) {
    // Find the next change, then grow the hunk while changes are within 2*context lines.
    while (k < ops.size() && ops[k].kind == ' ') ++k;
    if (k == ops.size()) break;
    std::size_t begin = k >= static_cast<std::size_t>(kContext) ? k - kContext : 0;
    std::size_t end = k;
    while (end < ops.size()) {
      if (ops[end].kind != ' ') {
        ++end;
        continue;
      }
      std::size_t run = end;
      while (run < ops.size() && ops[run].kind == ' ') ++run;
      if (run == ops.size() || run - end > 2 * static_cast<std::size_t>(kContext)) {
        end = std::min(run, end + kContext);
        break;
      }
      end = run;
    }
    int old_start = ops[begin].old_idx, new_start = ops[begin].new_idx, old_count = 0, new_count = 0;
    std::string body;
    for (std::size_t x = begin; x < end; ++x) {
      const auto& op = ops[x];
      const Line& l = op.kind == '+' ? b[op.new_idx] : a[op.old_idx];
      if (op.kind != '+') ++old_count;
      if (op.kind != '-') ++new_count;
      body += op.kind + l.text + "\n";
      if (l.no_newline) body += "\\ No newline at end of file\n";
    }
    out += "@@ -" + range(old_start, old_count) + " +" + range(new_start, new_count) + " @@\n" + body;
    k = end;
  }
  return out;
}

}  // namespace ibdisk::setup
