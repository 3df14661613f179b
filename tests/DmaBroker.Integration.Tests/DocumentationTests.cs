namespace DmaBroker.Integration.Tests;

/// <summary>
/// What the documents tell users to run works: the README's C# example is the Quickstart
/// sample's marked region, which the build compiles and this runs against a real broker; the
/// sample systemd unit's command line starts a broker.
/// </summary>
public sealed class DocumentationTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);

    [Fact]
    public void Readme_CSharpExample_IsTheQuickstartSample()
    {
        var root = RepositoryRoot();
        var readme = File.ReadAllLines(Path.Combine(root, "README.md"));
        var open = Array.IndexOf(readme, "```csharp");
        Assert.True(open >= 0, "README.md has no ```csharp block");
        var close = Array.IndexOf(readme, "```", open + 1);
        var sample = File.ReadAllLines(Path.Combine(root, "clients", "samples", "Quickstart", "Program.cs"));
        var begin = Array.IndexOf(sample, "// <readme>");
        var end = Array.IndexOf(sample, "// </readme>");
        Assert.True(begin >= 0 && end > begin, "Quickstart/Program.cs lost its // <readme> markers");

        Assert.Equal(sample[(begin + 1)..end], readme[(open + 1)..close]);
    }

    [Fact]
    public async Task Quickstart_AgainstALiveBroker_TheDeviceWritesHelloIntoTheBuffer()
    {
        await using var broker = await LiveBroker.StartAsync();
        await using var quickstart = ClientProcess.Start(new ProcessSetup { Environment = new Dictionary<string, string?> { ["DMABROKER_ADDRESS"] = broker.Address } }, "Quickstart.dll");

        Assert.Equal(0, await quickstart.WaitForExitAsync(Timeout));
        Assert.Contains("the device wrote 'hello' through IOVA 0x100000", quickstart.Transcript, StringComparison.Ordinal);
    }

    /// <summary>
    /// The README's edu driver transcript is what the sample prints, on edu devices as slow as QEMU's
    /// (100 ms a DMA): a driver that read its data back without waiting for the DMA would fail.
    /// </summary>
    [Fact]
    public async Task EduDriver_AgainstDevicesWithQemusDmaLatency_PrintsTheReadmesTranscript()
    {
        var root = RepositoryRoot();
        var readme = File.ReadAllLines(Path.Combine(root, "README.md"));
        var command = Array.IndexOf(readme, "$ dotnet run --project clients/samples/EduDriver");
        Assert.True(command >= 0, "README.md no longer shows the edu driver's run");
        var expected = readme[(command + 1)..Array.IndexOf(readme, "```", command)];
        var json = File.ReadAllText(Path.Combine(root, "src", "DmaBroker.Core", "Topology", "default-topology.json"));
        var directory = Directory.CreateTempSubdirectory("edu-latency-").FullName;
        try
        {
            var topology = Path.Combine(directory, "topology.json");
            File.WriteAllText(topology, json.Replace("\"model\": \"edu\"", "\"model\": \"edu\", \"dmaLatencyUs\": 100000", StringComparison.Ordinal));
            await using var broker = await LiveBroker.StartAsync("--topology", topology);
            await using var driver = ClientProcess.StartEduDriver(broker.Address, "0000:08:00.0");

            Assert.Equal(0, await driver.WaitForExitAsync(Timeout));
            Assert.Equal(expected, driver.Stdout);
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Fact]
    public async Task SystemdUnit_ExecStart_StartsABrokerOnItsSocketWithTheExampleAuthFile()
    {
        var root = RepositoryRoot();
        var unit = File.ReadAllText(Path.Combine(root, "deploy", "dmabroker.service")).Replace("\\\n", " ", StringComparison.Ordinal);
        var execStart = unit.Split('\n').Single(l => l.StartsWith("ExecStart=", StringComparison.Ordinal));
        var words = execStart.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("ExecStart=/usr/bin/dotnet", words[0]);
        Assert.Equal("/opt/dmabroker/DmaBroker.Server.dll", words[1]);
        // The unit's paths and ports, moved where a test may use them.
        var run = Directory.CreateTempSubdirectory("dmabroker-unit-").FullName;
        try
        {
            var args = words[2..].Select(w => w
                .Replace("/run/dmabroker/", run + "/", StringComparison.Ordinal)
                .Replace("/etc/dmabroker/auth.json", Path.Combine(root, "docs", "auth.example.json"), StringComparison.Ordinal)
                .Replace(":9464", ":0", StringComparison.Ordinal)).ToArray();
            await using var broker = ClientProcess.Start(LiveBroker.AssemblyPath, args);
            var banner = await broker.WaitForLineAsync("DmaBroker ", Timeout);
            Assert.Contains($"serving unix://{run}/broker.sock", banner, StringComparison.Ordinal);
            Assert.Contains("auth: auth file", banner, StringComparison.Ordinal);
            Assert.Contains("metrics and live view on http://127.0.0.1:", banner, StringComparison.Ordinal);
            broker.Interrupt();
            Assert.Equal(0, await broker.WaitForExitAsync(Timeout));
        }
        finally
        {
            Directory.Delete(run, recursive: true);
        }
    }

    [Fact]
    public async Task BrokerHelp_EveryOption_IsInTheReadme()
    {
        await using var help = ClientProcess.Start(LiveBroker.AssemblyPath, "--help");
        Assert.Equal(0, await help.WaitForExitAsync(Timeout));
        var options = System.Text.RegularExpressions.Regex.Matches(help.Transcript, @"^\s+(?:-h, )?(--[a-z][a-z-]+)", System.Text.RegularExpressions.RegexOptions.Multiline)
            .Select(m => m.Groups[1].Value).Distinct().ToList();
        Assert.Contains("--listen", options);
        Assert.Contains("--http-listen", options);
        // The options table: rows whose first cell names the options, as `--name <value>` or `--name`.
        var rows = File.ReadAllLines(Path.Combine(RepositoryRoot(), "README.md"))
            .Where(l => l.StartsWith("| `--", StringComparison.Ordinal)).Select(l => l.Split('|')[1]).ToList();

        Assert.All(options.Where(o => o != "--help"), option =>
            Assert.Contains(rows, cell => cell.Contains($"`{option} ", StringComparison.Ordinal) || cell.Contains($"`{option}`", StringComparison.Ordinal)));
    }

    internal static string RepositoryRoot()
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "DmaBroker.sln")))
                return directory.FullName;
        }
        throw new InvalidOperationException($"no DmaBroker.sln above {AppContext.BaseDirectory}");
    }
}
