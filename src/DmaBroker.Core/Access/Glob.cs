namespace DmaBroker.Core.Access;

/// <summary>
/// Shell-style patterns, as the auth file writes them. Principal names use only <c>*</c> (any run of
/// characters, SPEC §12); device address globs also take <c>?</c> and classes such as <c>[89a-f]</c>,
/// as fnmatch(3) does. Matching ignores ASCII case, so <c>0000:0A:*</c> and <c>0000:0a:*</c> agree.
/// </summary>
public static class Glob
{
    /// <summary>Matches <paramref name="text"/> against a pattern whose only wildcard is <c>*</c>.</summary>
    public static bool MatchStar(ReadOnlySpan<char> pattern, ReadOnlySpan<char> text) => Match(pattern, text, classes: false);

    /// <summary>Matches <paramref name="text"/> against an fnmatch-style pattern: <c>*</c>, <c>?</c> and <c>[…]</c> (with ranges and <c>!</c> or <c>^</c> to negate).</summary>
    public static bool MatchFull(ReadOnlySpan<char> pattern, ReadOnlySpan<char> text) => Match(pattern, text, classes: true);

    /// <summary>True when <paramref name="pattern"/> has a wildcard, so it names more than one thing.</summary>
    public static bool HasWildcard(ReadOnlySpan<char> pattern) => pattern.IndexOfAny('*', '?', '[') >= 0;

    // Iterative matcher with one backtrack point (the last '*'): linear in practice, never exponential.
    private static bool Match(ReadOnlySpan<char> pattern, ReadOnlySpan<char> text, bool classes)
    {
        int p = 0, t = 0, starP = -1, starT = 0;
        while (t < text.Length)
        {
            if (p < pattern.Length)
            {
                var c = pattern[p];
                if (c == '*')
                {
                    starP = ++p;
                    starT = t;
                    continue;
                }
                if (classes && c == '?')
                {
                    p++;
                    t++;
                    continue;
                }
                if (classes && c == '[' && TryClass(pattern[p..], text[t], out var length, out var matched))
                {
                    if (matched)
                    {
                        p += length;
                        t++;
                        continue;
                    }
                }
                else if (Same(c, text[t]))
                {
                    p++;
                    t++;
                    continue;
                }
            }
            if (starP < 0)
                return false;
            p = starP;
            t = ++starT;
        }
        while (p < pattern.Length && pattern[p] == '*')
            p++;
        return p == pattern.Length;
    }

    /// <summary>Reads a class <c>[…]</c> at the start of <paramref name="pattern"/>; false when it is not closed (then '[' is literal).</summary>
    private static bool TryClass(ReadOnlySpan<char> pattern, char ch, out int length, out bool matched)
    {
        length = 0;
        matched = false;
        var i = 1;
        var negate = i < pattern.Length && pattern[i] is '!' or '^';
        if (negate)
            i++;
        var first = true;
        var any = false;
        while (i < pattern.Length && (first || pattern[i] != ']'))
        {
            first = false;
            var lo = pattern[i];
            if (i + 2 < pattern.Length && pattern[i + 1] == '-' && pattern[i + 2] != ']')
            {
                var hi = pattern[i + 2];
                any |= InRange(ch, lo, hi);
                i += 3;
            }
            else
            {
                any |= Same(lo, ch);
                i++;
            }
        }
        if (i >= pattern.Length)
            return false;
        length = i + 1;
        matched = any != negate;
        return true;
    }

    private static bool InRange(char ch, char lo, char hi)
    {
        var c = char.ToLowerInvariant(ch);
        return (c >= char.ToLowerInvariant(lo) && c <= char.ToLowerInvariant(hi))
            || (ch >= lo && ch <= hi);
    }

    private static bool Same(char a, char b) => a == b || (char.IsAscii(a) && char.ToLowerInvariant(a) == char.ToLowerInvariant(b));
}
