using System.Reflection;
using System.Text.RegularExpressions;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// The README's benchmark command (tests/DmaBroker.Benchmarks), run as a process from its own output
/// folder: its options parse strictly, every section key the README's Performance section names
/// exists, and a quick run of a few sections ends its output with the table, every row beside its
/// baseline. A smoke run, seconds long: it checks that the command works, never how fast anything is.
/// </summary>
public sealed partial class BenchmarkCommandTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(120);

    /// <summary>The benchmark command's assembly in its own output folder (the build writes its path into this assembly).</summary>
    private static readonly string AssemblyPath = typeof(BenchmarkCommandTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>()
        .Single(a => a.Key == "BenchmarksAssemblyPath").Value!;

    [Fact]
    public async Task List_NamesEverySectionTheReadmesPerformanceSectionShows()
    {
        var keys = await RunAsync(0, "--list");

        Assert.Contains("dma", keys);
        Assert.Equal(keys.Distinct().Count(), keys.Count);
        var readme = File.ReadAllLines(Path.Combine(DocumentationTests.RepositoryRoot(), "README.md"));
        var start = Array.IndexOf(readme, "## Performance");
        Assert.True(start >= 0, "README.md has no '## Performance' section");
        var end = Array.FindIndex(readme, start + 1, l => l.StartsWith("## ", StringComparison.Ordinal));
        var section = readme[start..(end < 0 ? readme.Length : end)];
        // The table's first column, and the keys of the commands it shows ("-- key ...").
        var named = section.Where(l => l.StartsWith("| ", StringComparison.Ordinal)).Select(l => l.Split('|')[1].Trim())
            .Where(cell => cell is not ("section" or "---" or ""))
            .Concat(section.SelectMany(l => CommandKeys().Matches(l).Select(m => m.Groups[1].Value)))
            .Distinct().ToList();
        Assert.NotEmpty(named);
        Assert.All(named, key => Assert.Contains(key, keys));
    }

    [Fact]
    public async Task Help_PrintsTheOptionsAndTheSections()
    {
        var help = string.Join('\n', await RunAsync(0, "--help"));

        Assert.Contains("--rounds N", help, StringComparison.Ordinal);
        Assert.Contains("--seconds S", help, StringComparison.Ordinal);
        Assert.Contains("--quick", help, StringComparison.Ordinal);
        Assert.Contains("--list", help, StringComparison.Ordinal);
        Assert.Contains("sections: dma ", help, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("unknown option '--fast'", "--fast")]
    [InlineData("unknown section 'nosuch'", "nosuch")]
    [InlineData("--rounds takes a whole number", "dma", "--rounds", "0")]
    [InlineData("--rounds takes a whole number", "--rounds")]
    [InlineData("--seconds takes a number", "--seconds", "soon")]
    public async Task BadArguments_OneLineOnStderr_Exit2_NothingRun(string error, params string[] args)
    {
        await using var process = ClientProcess.Start(AssemblyPath, args);

        Assert.Equal(2, await process.WaitForExitAsync(Timeout));
        Assert.Empty(process.Stdout);
        var line = Assert.Single(process.Stderr);
        Assert.StartsWith("benchmarks: ", line, StringComparison.Ordinal);
        Assert.Contains(error, line, StringComparison.Ordinal);
    }

    [Fact]
    public async Task QuickRun_EndsWithTheTable_EveryRowBesideItsBaseline()
    {
        string[] sections = ["dma", "rtt", "claim", "lookup"];
        var output = await RunAsync(0, [.. sections, "--quick", "--seconds", "0.1"]);

        var header = output.FindIndex(l => l.StartsWith("DmaBroker benchmarks, ", StringComparison.Ordinal));
        Assert.True(header >= 0, string.Join('\n', output));
        Assert.Contains("load average", output[header], StringComparison.Ordinal);
        Assert.Contains("--quick", output[header], StringComparison.Ordinal);
        var table = output.Skip(header).SkipWhile(l => !l.StartsWith("| section |", StringComparison.Ordinal)).ToList();
        var rows = table.Skip(2).TakeWhile(l => l.StartsWith("| ", StringComparison.Ordinal)).Select(l => l.Split('|').Select(c => c.Trim()).ToArray()).ToList();
        // Every section has rows, and every row a result, a baseline measured beside it and their ratio.
        Assert.Equal(sections, rows.Select(r => r[1]).Distinct());
        Assert.Contains(rows, r => r[2].StartsWith("DMA write 1 MiB", StringComparison.Ordinal));
        Assert.Contains(rows, r => r[2].StartsWith("claim+release cycles/s, 8 callers", StringComparison.Ordinal));
        Assert.All(rows, r =>
        {
            Assert.Matches(@"^[0-9][0-9,.]* ", r[3]);
            Assert.Matches(@" [0-9][0-9,.]* ", r[4]);
            Assert.Matches(@"^[0-9]+ %", r[5]);
        });
        // Each row's detail is a numbered note after the table, and the notes are the output's end.
        var notes = table.Skip(2 + rows.Count).Where(l => l.Length > 0).ToList();
        Assert.Equal(rows.Count, notes.Count);
        Assert.All(notes, n => Assert.Matches(@"^\[[0-9]+\] ", n));
    }

    /// <summary>Runs the command to its end in a directory of its own (for BenchmarkDotNet.Artifacts/), expecting <paramref name="exitCode"/>: its stdout lines.</summary>
    private static async Task<List<string>> RunAsync(int exitCode, params string[] args)
    {
        var directory = Directory.CreateTempSubdirectory("dmabroker-bench-test-").FullName;
        try
        {
            await using var process = ClientProcess.Start(new ProcessSetup { WorkingDirectory = directory }, AssemblyPath, args);
            var code = await process.WaitForExitAsync(Timeout);
            Assert.True(code == exitCode, $"exit {code}:\n{process.Transcript}");
            return [.. process.Stdout];
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [GeneratedRegex(@"--project tests/DmaBroker\.Benchmarks -- ([a-z][a-z-]*)")]
    private static partial Regex CommandKeys();
}
