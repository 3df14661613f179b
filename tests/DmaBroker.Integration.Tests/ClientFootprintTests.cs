using System.Text.Json;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// The client side runs on the plain .NET runtime: dmactl and the samples must not ask for the
/// ASP.NET Core shared framework, nor carry any Microsoft.AspNetCore assembly. Their
/// runtimeconfig and deps files are copied next to these tests by the project references.
/// </summary>
public sealed class ClientFootprintTests
{
    private static readonly string[] AspNetCorePrefixes = ["Microsoft.AspNetCore", "Grpc.AspNetCore"];

    [Theory]
    [InlineData("dmactl")]
    [InlineData("EduDriver")]
    [InlineData("StreamingDriver")]
    [InlineData("NvmeDriver")]
    public void ClientProgram_NeedsOnlyTheNetRuntime(string program)
    {
        Assert.Equal(["Microsoft.NETCore.App"], Frameworks(program));
        Assert.Empty(AspNetCoreLibraries(program));
    }

    [Fact]
    public void Broker_IsTheOnlyProgramOnAspNetCore()
    {
        // The check above would pass vacuously if it could not see a framework reference at all.
        Assert.Contains("Microsoft.AspNetCore.App", Frameworks(Path.ChangeExtension(LiveBroker.AssemblyPath, null)));
    }

    /// <summary>The shared frameworks a program (a name next to the tests, or a path without extension) asks for.</summary>
    private static string[] Frameworks(string program)
    {
        using var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, $"{program}.runtimeconfig.json")));
        var options = config.RootElement.GetProperty("runtimeOptions");
        IEnumerable<JsonElement> frameworks = options.TryGetProperty("frameworks", out var many)
            ? many.EnumerateArray()
            : [options.GetProperty("framework")];
        return [.. frameworks.Select(f => f.GetProperty("name").GetString()!).Order(StringComparer.Ordinal)];
    }

    /// <summary>Every library and runtime assembly the program's deps.json names that comes from ASP.NET Core or gRPC's server for it.</summary>
    private static string[] AspNetCoreLibraries(string program)
    {
        using var deps = JsonDocument.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, $"{program}.deps.json")));
        var names = new List<string>();
        foreach (var library in deps.RootElement.GetProperty("libraries").EnumerateObject())
            names.Add(library.Name);
        foreach (var target in deps.RootElement.GetProperty("targets").EnumerateObject())
        {
            foreach (var library in target.Value.EnumerateObject())
            {
                if (library.Value.TryGetProperty("runtime", out var runtime))
                    names.AddRange(runtime.EnumerateObject().Select(a => Path.GetFileName(a.Name)));
            }
        }
        return [.. names.Where(n => AspNetCorePrefixes.Any(p => n.StartsWith(p, StringComparison.OrdinalIgnoreCase))).Distinct()];
    }
}
